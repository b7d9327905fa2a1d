"""The Python SDK: :class:`Client` and :class:`AsyncClient` for the keygrants HTTP API.

Both read ``KEYGRANTS_ADDR`` (default ``http://127.0.0.1:8650``) and ``KEYGRANTS_TOKEN`` from
the environment unless given ``addr=`` / ``token=``. Results are the typed structs of
:mod:`keygrants.models`; failures raise the typed error tree of :mod:`keygrants.errors`
(rebuilt from the server's error ``code``), and an unreachable server raises
:class:`~keygrants.errors.ServerUnreachable`.

Each operation is described once, as an :class:`_Op` built by a function of :mod:`_ops`; the
two clients differ only in how they send it.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, Generic, TypeVar

import httpx
import msgspec

from keygrants import models as m
from keygrants.crypto.signing import SigningKey
from keygrants.errors import KeygrantsError, ServerUnreachable, error_from_code

__all__ = ["DEFAULT_ADDR", "AsyncClient", "Client"]

DEFAULT_ADDR: Final = "http://127.0.0.1:8650"
ADDR_ENV: Final = "KEYGRANTS_ADDR"
TOKEN_ENV: Final = "KEYGRANTS_TOKEN"
PRINCIPAL_ENV: Final = "KEYGRANTS_PRINCIPAL"
KEY_FILE_ENV: Final = "KEYGRANTS_KEY_FILE"
T = TypeVar("T")
_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class _Op(Generic[T]):
    method: str
    path: str
    body: Any
    result: Any  # the msgspec decode type of T (None for no content)
    params: dict[str, str] | None = None


def _q(segment: str) -> str:
    """A key reference as one path segment (refuse anything that would change the path)."""
    if not segment or "/" in segment or segment in (".", "..") or "?" in segment or "#" in segment:
        raise ValueError(f"invalid key or alias reference {segment!r}")
    return segment


class _Ops:
    """Builds each operation's request; shared by both clients."""

    @staticmethod
    def create_key(name: str, *, spec: str = "aes-256-gcm", description: str = "",
                   rotation_period: int | None = None, derivable: bool = False,
                   tags: Sequence[str] = ()) -> _Op[m.KeyInfo]:
        body = m.CreateKeyRequest(name=name, spec=spec, description=description,
                                  rotation_period=rotation_period, derivable=derivable,
                                  tags=list(tags))
        return _Op("POST", "/v1/keys", body, m.KeyInfo)

    @staticmethod
    def list_keys(*, limit: int = 100, after: str | None = None) -> _Op[m.KeyList]:
        params = {"limit": str(limit)} | ({"after": after} if after else {})
        return _Op("GET", "/v1/keys", None, m.KeyList, params)

    @staticmethod
    def describe_key(key: str) -> _Op[m.KeyInfo]:
        return _Op("GET", f"/v1/keys/{_q(key)}", None, m.KeyInfo)

    @staticmethod
    def update_key(key: str, *, description: str | None = None,
                   rotation_period: int | None = None,
                   min_decryption_version: int | None = None,
                   tags: Sequence[str] | None = None) -> _Op[m.KeyInfo]:
        body = m.UpdateKeyRequest(description=description, rotation_period=rotation_period,
                                  min_decryption_version=min_decryption_version,
                                  tags=None if tags is None else list(tags))
        return _Op("PATCH", f"/v1/keys/{_q(key)}", body, m.KeyInfo)

    @staticmethod
    def key_action(key: str, action: str, body: Any = None) -> _Op[m.KeyInfo]:
        return _Op("POST", f"/v1/keys/{_q(key)}/{action}", body, m.KeyInfo)

    @staticmethod
    def create_alias(alias: str, key: str) -> _Op[m.AliasInfo]:
        return _Op("POST", "/v1/aliases", m.CreateAliasRequest(alias=alias, key=key), m.AliasInfo)

    @staticmethod
    def list_aliases(key: str | None = None) -> _Op[list[m.AliasInfo]]:
        return _Op("GET", "/v1/aliases", None, list[m.AliasInfo], {"key": key} if key else None)

    @staticmethod
    def delete_alias(alias: str) -> _Op[None]:
        return _Op("DELETE", f"/v1/aliases/{_q(alias)}", None, None)

    @staticmethod
    def encrypt(key: str, plaintext: bytes, context: Mapping[str, str] | None) -> _Op[m.EncryptResult]:
        body = m.EncryptRequest(plaintext=plaintext, context=dict(context) if context else None)
        return _Op("POST", f"/v1/keys/{_q(key)}/encrypt", body, m.EncryptResult)

    @staticmethod
    def decrypt(ciphertext: bytes, context: Mapping[str, str] | None) -> _Op[m.DecryptResult]:
        body = m.DecryptRequest(ciphertext=ciphertext, context=dict(context) if context else None)
        return _Op("POST", "/v1/decrypt", body, m.DecryptResult)

    @staticmethod
    def re_encrypt(ciphertext: bytes, *, context: Mapping[str, str] | None,
                   destination_key: str | None,
                   destination_context: Mapping[str, str] | None) -> _Op[m.ReEncryptResult]:
        body = m.ReEncryptRequest(
            ciphertext=ciphertext, context=dict(context) if context else None,
            destination_key=destination_key,
            destination_context=None if destination_context is None else dict(destination_context))
        return _Op("POST", "/v1/re-encrypt", body, m.ReEncryptResult)

    @staticmethod
    def generate_data_key(key: str, *, size: int, context: Mapping[str, str] | None,
                          include_plaintext: bool) -> _Op[m.DataKey]:
        body = m.DataKeyRequest(bytes=size, context=dict(context) if context else None,
                                include_plaintext=include_plaintext)
        return _Op("POST", f"/v1/keys/{_q(key)}/data-key", body, m.DataKey)

    @staticmethod
    def batch_encrypt(key: str, items: Sequence[tuple[bytes, Mapping[str, str] | None]]
                      ) -> _Op[m.BatchResult]:
        body = m.BatchEncryptRequest(items=[
            m.BatchEncryptItem(plaintext=p, context=dict(c) if c else None) for p, c in items])
        return _Op("POST", f"/v1/keys/{_q(key)}/encrypt-batch", body, m.BatchResult)

    @staticmethod
    def batch_decrypt(items: Sequence[tuple[bytes, Mapping[str, str] | None]]) -> _Op[m.BatchResult]:
        body = m.BatchDecryptRequest(items=[
            m.BatchDecryptItem(ciphertext=ct, context=dict(c) if c else None) for ct, c in items])
        return _Op("POST", "/v1/decrypt-batch", body, m.BatchResult)

    @staticmethod
    def sign(key: str, message: bytes, message_type: m.MessageType) -> _Op[m.SignResult]:
        body = m.SignRequest(message=message, message_type=message_type)
        return _Op("POST", f"/v1/keys/{_q(key)}/sign", body, m.SignResult)

    @staticmethod
    def verify(key: str, message: bytes, signature: bytes, message_type: m.MessageType,
               key_version: int | None) -> _Op[m.VerifyResult]:
        body = m.VerifyRequest(message=message, signature=signature, message_type=message_type,
                               key_version=key_version)
        return _Op("POST", f"/v1/keys/{_q(key)}/verify", body, m.VerifyResult)

    @staticmethod
    def get_public_key(key: str, version: int | None) -> _Op[m.PublicKey]:
        params = {"version": str(version)} if version is not None else None
        return _Op("GET", f"/v1/keys/{_q(key)}/public-key", None, m.PublicKey, params)

    @staticmethod
    def mac(key: str, message: bytes) -> _Op[m.MacResult]:
        return _Op("POST", f"/v1/keys/{_q(key)}/mac", m.MacRequest(message=message), m.MacResult)

    @staticmethod
    def verify_mac(key: str, message: bytes, mac: bytes, key_version: int | None) -> _Op[m.VerifyResult]:
        body = m.VerifyMacRequest(message=message, mac=mac, key_version=key_version)
        return _Op("POST", f"/v1/keys/{_q(key)}/verify-mac", body, m.VerifyResult)

    @staticmethod
    def derive(key: str, context: Mapping[str, str], *, length: int, salt: bytes | None,
               key_version: int | None) -> _Op[m.DerivedKey]:
        body = m.DeriveRequest(context=dict(context), length=length, salt=salt,
                               key_version=key_version)
        return _Op("POST", f"/v1/keys/{_q(key)}/derive", body, m.DerivedKey)

    @staticmethod
    def random(n: int) -> _Op[m.RandomResult]:
        return _Op("POST", "/v1/random", m.RandomRequest(bytes=n), m.RandomResult)

    @staticmethod
    def audit_checkpoint(*, now: bool) -> _Op[m.AuditCheckpoint]:
        return _Op("POST" if now else "GET", "/v1/audit/checkpoint", None, m.AuditCheckpoint)

    @staticmethod
    def audit_search(*, principal: str | None, key: str | None, grant: str | None,
                     type: str | None, since: str | None, until: str | None,
                     after: int | None, limit: int) -> _Op[m.AuditEventPage]:
        params = {k: str(v) for k, v in (("principal", principal), ("key", key), ("grant", grant),
                                          ("type", type), ("since", since), ("until", until),
                                          ("after", after), ("limit", limit)) if v is not None}
        return _Op("GET", "/v1/audit/events", None, m.AuditEventPage, params)

    @staticmethod
    def audit_inclusion_proof(index: int, size: int | None) -> _Op[m.InclusionProof]:
        params = {"index": str(index)} | ({"size": str(size)} if size is not None else {})
        return _Op("GET", "/v1/audit/proof/inclusion", None, m.InclusionProof, params)

    @staticmethod
    def audit_consistency_proof(old: int, new: int | None) -> _Op[m.ConsistencyProof]:
        params = {"old": str(old)} | ({"new": str(new)} if new is not None else {})
        return _Op("GET", "/v1/audit/proof/consistency", None, m.ConsistencyProof, params)

    @staticmethod
    def audit_hash(value: str) -> _Op[m.AuditDigest]:
        return _Op("POST", "/v1/audit/hash", m.AuditHashRequest(value=value), m.AuditDigest)

    @staticmethod
    def audit_key() -> _Op[m.AuditKey]:
        return _Op("GET", "/v1/audit/key", None, m.AuditKey)


def _signature_auth(principal: str | None, key_file: str | None,
                    signing_key: SigningKey | None, token: str | None) -> httpx.Auth | None:
    """RFC 9421 request signing when a principal and its key are configured (arguments first,
    then ``KEYGRANTS_PRINCIPAL`` + ``KEYGRANTS_KEY_FILE`` unless a token was passed explicitly).

    The key file holds a PEM private key (Ed25519 or ECDSA P-256; the keyid is
    ``<principal>/<JWK thumbprint>``) or a shared secret ``kg_ss_…`` (hmac-sha256; the keyid is
    ``<principal>/ss_…``).
    """
    from keygrants.auth.credentials import SHARED_SECRET_PREFIX, jwk_thumbprint, parse_shared_secret
    from keygrants.client._signing import SignatureAuth, load_signing_key

    if token is None and principal is None and key_file is None and signing_key is None:
        principal = os.environ.get(PRINCIPAL_ENV) or None
        key_file = os.environ.get(KEY_FILE_ENV) or None
    if key_file is None and signing_key is None and principal is None:
        return None
    if not principal or (key_file is None and signing_key is None):
        raise ValueError("request signing needs both a principal (KEYGRANTS_PRINCIPAL) and its "
                         "key file (KEYGRANTS_KEY_FILE)")
    if signing_key is None:
        assert key_file is not None
        with open(key_file, "rb") as f:
            head = f.read(len(SHARED_SECRET_PREFIX))
        if head == SHARED_SECRET_PREFIX.encode():
            with open(key_file) as f:
                parsed = parse_shared_secret(f.read())
            if parsed is None:
                raise ValueError(f"{key_file} does not hold a well-formed shared secret")
            return SignatureAuth(f"{principal}/{parsed[0]}", parsed[1])
        signing_key = load_signing_key(key_file)
    keyid = f"{principal}/{jwk_thumbprint(signing_key.public_key().jwk())}"
    return SignatureAuth(keyid, signing_key)


def _tls(verify: bool | str, cert: tuple[str, str] | None) -> bool | str | ssl.SSLContext:
    """httpx's ``verify``: an SSL context for a CA bundle path and for the client certificate
    of mTLS (httpx deprecates both as plain arguments)."""
    if cert is None and not isinstance(verify, str):
        return verify
    context = (ssl.create_default_context(cafile=verify) if isinstance(verify, str)
               else ssl.create_default_context())
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(cert[0], cert[1])
    return context


def _settings(addr: str | None, token: str | None, auth: httpx.Auth | None = None
              ) -> tuple[str, dict[str, str]]:
    addr = (addr or os.environ.get(ADDR_ENV) or DEFAULT_ADDR).rstrip("/")
    if "://" not in addr:
        addr = "http://" + addr
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    headers = {"Accept": "application/json", "User-Agent": "keygrants-python"}
    if token and auth is None:
        token = token.strip()
        if not token.isprintable() or " " in token:
            raise ValueError("the token contains spaces or control characters; check how it was "
                             "copied")
        headers["Authorization"] = f"Bearer {token}"
    return addr, headers


def _result(op: _Op[T], response: httpx.Response) -> T:
    if response.status_code >= 400:
        try:
            err = msgspec.json.decode(response.content)["error"]
            raise error_from_code(str(err["code"]), str(err["message"]),
                                  request_id=err.get("request_id"), status=response.status_code)
        except (msgspec.DecodeError, KeyError, TypeError):
            raise KeygrantsError(f"HTTP {response.status_code} from server") from None
    if op.result is None:
        return None  # type: ignore[return-value]  # T is None for operations without content
    try:
        return msgspec.json.decode(response.content, type=op.result)  # type: ignore[no-any-return]
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise KeygrantsError(f"unexpected response from server: {exc}") from None


def _content(op: _Op[Any]) -> bytes | None:
    return None if op.body is None else _encoder.encode(op.body)


class Client:
    """Synchronous client.

    Args:
        addr: server address (``KEYGRANTS_ADDR``, default ``http://127.0.0.1:8650``).
        token: bearer token: an API key or the admin token (``KEYGRANTS_TOKEN``).
        principal: sign every request (RFC 9421) as this principal (``KEYGRANTS_PRINCIPAL``).
        key_file: the principal's PEM private key (``KEYGRANTS_KEY_FILE``).
        signing_key: the private key itself, instead of ``key_file``.
        cert: ``(certificate file, key file)`` for mTLS.
        timeout: seconds for connect and read.
        transport: an ``httpx`` transport (e.g. ``httpx.ASGITransport`` or a mock in tests).
        verify: TLS verification (a CA bundle path, or ``False`` only for tests).
    """

    def __init__(self, addr: str | None = None, *, token: str | None = None,
                 principal: str | None = None, key_file: str | None = None,
                 signing_key: SigningKey | None = None,
                 cert: tuple[str, str] | None = None,
                 timeout: float = 10.0, transport: httpx.BaseTransport | None = None,
                 verify: bool | str = True) -> None:
        auth = _signature_auth(principal, key_file, signing_key, token)
        self.addr, headers = _settings(addr, token, auth)
        self._http = httpx.Client(base_url=self.addr, headers=headers, timeout=timeout,
                                  auth=auth, transport=transport, verify=_tls(verify, cert))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close connections."""
        self._http.close()

    def _call(self, op: _Op[T]) -> T:
        headers = {"Content-Type": "application/json"} if op.body is not None else None
        try:
            response = self._http.request(op.method, op.path, content=_content(op),
                                          params=op.params, headers=headers)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.addr}: {exc}") from exc
        return _result(op, response)

    # -- keys ----------------------------------------------------------------------------
    def create_key(self, name: str, *, spec: str = "aes-256-gcm", description: str = "",
                   rotation_period: int | None = None, derivable: bool = False,
                   tags: Sequence[str] = ()) -> m.KeyInfo:
        """Create a key (``rotation_period`` in seconds; ``tags`` for policies to match)."""
        return self._call(_Ops.create_key(name, spec=spec, description=description,
                                          rotation_period=rotation_period, derivable=derivable,
                                          tags=tags))

    def list_keys(self, *, limit: int = 100, after: str | None = None) -> m.KeyList:
        """One page of keys."""
        return self._call(_Ops.list_keys(limit=limit, after=after))

    def describe_key(self, key: str) -> m.KeyInfo:
        """A key's metadata, by id, name or alias."""
        return self._call(_Ops.describe_key(key))

    def update_key(self, key: str, *, description: str | None = None,
                   rotation_period: int | None = None,
                   min_decryption_version: int | None = None,
                   tags: Sequence[str] | None = None) -> m.KeyInfo:
        """Change settings (``rotation_period=0`` turns scheduled rotation off; ``tags``
        replaces the set)."""
        return self._call(_Ops.update_key(key, description=description,
                                          rotation_period=rotation_period,
                                          min_decryption_version=min_decryption_version,
                                          tags=tags))

    def rotate_key(self, key: str) -> m.KeyInfo:
        """Add a new version."""
        return self._call(_Ops.key_action(key, "rotate"))

    def disable_key(self, key: str) -> m.KeyInfo:
        """Disable a key."""
        return self._call(_Ops.key_action(key, "disable"))

    def enable_key(self, key: str) -> m.KeyInfo:
        """Enable a key."""
        return self._call(_Ops.key_action(key, "enable"))

    def schedule_key_deletion(self, key: str, *, days: int = 30) -> m.KeyInfo:
        """Schedule destruction after ``days`` (7 to 30)."""
        return self._call(_Ops.key_action(key, "schedule-deletion",
                                          m.ScheduleDeletionRequest(days=days)))

    def cancel_key_deletion(self, key: str) -> m.KeyInfo:
        """Cancel a scheduled deletion."""
        return self._call(_Ops.key_action(key, "cancel-deletion"))

    def create_alias(self, alias: str, key: str) -> m.AliasInfo:
        """Point an alias at a key."""
        return self._call(_Ops.create_alias(alias, key))

    def list_aliases(self, key: str | None = None) -> list[m.AliasInfo]:
        """All aliases, or one key's."""
        return self._call(_Ops.list_aliases(key))

    def delete_alias(self, alias: str) -> None:
        """Delete an alias."""
        self._call(_Ops.delete_alias(alias))

    # -- crypto --------------------------------------------------------------------------
    def encrypt(self, key: str, plaintext: bytes, *,
                context: Mapping[str, str] | None = None) -> m.EncryptResult:
        """Encrypt under the key's latest version."""
        return self._call(_Ops.encrypt(key, plaintext, context))

    def decrypt(self, ciphertext: bytes, *,
                context: Mapping[str, str] | None = None) -> m.DecryptResult:
        """Decrypt a native ciphertext."""
        return self._call(_Ops.decrypt(ciphertext, context))

    def re_encrypt(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None,
                   destination_key: str | None = None,
                   destination_context: Mapping[str, str] | None = None) -> m.ReEncryptResult:
        """Re-encrypt to the latest version or another key, inside the server."""
        return self._call(_Ops.re_encrypt(
            ciphertext, context=context, destination_key=destination_key,
            destination_context=destination_context))

    def generate_data_key(self, key: str, *, size: int = 32,
                          context: Mapping[str, str] | None = None,
                          include_plaintext: bool = True) -> m.DataKey:
        """A fresh data key of 16, 32 or 64 bytes."""
        return self._call(_Ops.generate_data_key(
            key, size=size, context=context, include_plaintext=include_plaintext))

    def batch_encrypt(self, key: str,
                      items: Sequence[tuple[bytes, Mapping[str, str] | None]]) -> m.BatchResult:
        """Encrypt up to 1,000 ``(plaintext, context)`` items."""
        return self._call(_Ops.batch_encrypt(key, items))

    def batch_decrypt(self, items: Sequence[tuple[bytes, Mapping[str, str] | None]]
                      ) -> m.BatchResult:
        """Decrypt up to 1,000 ``(ciphertext, context)`` items."""
        return self._call(_Ops.batch_decrypt(items))

    def sign(self, key: str, message: bytes, *,
             message_type: m.MessageType = "raw") -> m.SignResult:
        """Sign a message (or a SHA-256 digest with ``message_type="digest"``)."""
        return self._call(_Ops.sign(key, message, message_type))

    def verify(self, key: str, message: bytes, signature: bytes, *,
               message_type: m.MessageType = "raw",
               key_version: int | None = None) -> m.VerifyResult:
        """Check a signature."""
        return self._call(_Ops.verify(
            key, message, signature, message_type, key_version))

    def get_public_key(self, key: str, *, version: int | None = None) -> m.PublicKey:
        """A signing key's public key (PEM and JWK)."""
        return self._call(_Ops.get_public_key(key, version))

    def mac(self, key: str, message: bytes) -> m.MacResult:
        """HMAC-SHA256 tag."""
        return self._call(_Ops.mac(key, message))

    def verify_mac(self, key: str, message: bytes, mac: bytes, *,
                   key_version: int | None = None) -> m.VerifyResult:
        """Check an HMAC tag."""
        return self._call(_Ops.verify_mac(key, message, mac, key_version))

    def derive(self, key: str, context: Mapping[str, str], *, length: int = 32,
               salt: bytes | None = None, key_version: int | None = None) -> m.DerivedKey:
        """HKDF-SHA256 from a derivable key."""
        return self._call(_Ops.derive(
            key, context, length=length, salt=salt, key_version=key_version))

    def random(self, n: int = 32) -> m.RandomResult:
        """Random bytes from the server."""
        return self._call(_Ops.random(n))

    # -- audit ---------------------------------------------------------------------------
    def audit_checkpoint(self, *, now: bool = False) -> m.AuditCheckpoint:
        """The latest signed checkpoint (``now=True``: make one first)."""
        return self._call(_Ops.audit_checkpoint(now=now))

    def audit_search(self, *, principal: str | None = None, key: str | None = None,
                     grant: str | None = None, type: str | None = None,
                     since: str | None = None, until: str | None = None,
                     after: int | None = None, limit: int = 100) -> m.AuditEventPage:
        """Audit events matching every given filter (times are RFC 3339 UTC strings)."""
        return self._call(_Ops.audit_search(principal=principal, key=key, grant=grant, type=type,
                                            since=since, until=until, after=after, limit=limit))

    def audit_inclusion_proof(self, index: int, *, size: int | None = None) -> m.InclusionProof:
        """RFC 6962 inclusion proof of an event."""
        return self._call(_Ops.audit_inclusion_proof(index, size))

    def audit_consistency_proof(self, old_size: int, new_size: int | None = None
                                ) -> m.ConsistencyProof:
        """RFC 6962 consistency proof between two tree sizes."""
        return self._call(_Ops.audit_consistency_proof(old_size, new_size))

    def audit_hash(self, value: str) -> m.AuditDigest:
        """The keyed digest the log records in place of ``value``."""
        return self._call(_Ops.audit_hash(value))

    def audit_key(self) -> m.AuditKey:
        """The audit log's origin and verifier key."""
        return self._call(_Ops.audit_key())

    def audit_export(self, out: BinaryIO, *, since: int = 0) -> int:
        """Stream the audit export (JSON Lines) into ``out``; returns the bytes written."""
        written = 0
        try:
            with self._http.stream("GET", "/v1/audit/export",
                                   params={"since": str(since)}) as response:
                if response.status_code >= 400:
                    response.read()
                    _result(_Op("GET", "", None, None), response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    written += len(chunk)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.addr}: {exc}") from exc
        return written
    # -- principals, credentials and policies ------------------------------------------
    def whoami(self) -> m.WhoAmI:
        """The authenticated caller."""
        return self._call(_Op("GET", "/v1/whoami", None, m.WhoAmI))

    def create_principal(
        self, principal: str, *, display_name: str = "", tags: Sequence[str] = ()
    ) -> m.PrincipalInfo:
        """Create a principal (a service or a person)."""
        return self._call(
            _Op(
                "POST",
                "/v1/principals",
                m.CreatePrincipalRequest(id=principal, display_name=display_name, tags=list(tags)),
                m.PrincipalInfo,
            )
        )

    def list_principals(self, *, limit: int = 100, after: str | None = None) -> m.PrincipalList:
        """One page of principals."""
        return self._call(
            _Op(
                "GET",
                "/v1/principals",
                None,
                m.PrincipalList,
                {"limit": str(limit)} | ({"after": after} if after else {}),
            )
        )

    def describe_principal(self, principal: str) -> m.PrincipalInfo:
        """A principal with its credentials."""
        return self._call(_Op("GET", f"/v1/principals/{_q(principal)}", None, m.PrincipalInfo))

    def update_principal(
        self, principal: str, *, display_name: str | None = None, tags: Sequence[str] | None = None
    ) -> m.PrincipalInfo:
        """Change display name or tags (``tags`` replaces the set)."""
        return self._call(
            _Op(
                "PATCH",
                f"/v1/principals/{_q(principal)}",
                m.UpdatePrincipalRequest(
                    display_name=display_name, tags=None if tags is None else list(tags)
                ),
                m.PrincipalInfo,
            )
        )

    def disable_principal(self, principal: str) -> m.PrincipalInfo:
        """Refuse all of a principal's credentials."""
        return self._call(
            _Op("POST", f"/v1/principals/{_q(principal)}/disable", None, m.PrincipalInfo)
        )

    def enable_principal(self, principal: str) -> m.PrincipalInfo:
        """Accept a principal's credentials again."""
        return self._call(
            _Op("POST", f"/v1/principals/{_q(principal)}/enable", None, m.PrincipalInfo)
        )

    def delete_principal(self, principal: str) -> None:
        """Delete a principal and its credentials."""
        self._call(_Op("DELETE", f"/v1/principals/{_q(principal)}", None, None))

    def add_public_key(
        self, principal: str, public_key: str, *, label: str = "", expires_in: int | None = None
    ) -> m.CredentialInfo:
        """Register a public key (PEM or JWK JSON) for signed requests."""
        return self._call(
            _Op(
                "POST",
                f"/v1/principals/{_q(principal)}/keys",
                m.AddPublicKeyRequest(public_key=public_key, label=label, expires_in=expires_in),
                m.CredentialInfo,
            )
        )

    def create_api_key(
        self, principal: str, *, label: str = "", expires_in: int | None = None
    ) -> m.ApiKeyCreated:
        """Issue an API key (``result.api_key`` is shown only once)."""
        return self._call(
            _Op(
                "POST",
                f"/v1/principals/{_q(principal)}/api-keys",
                m.CreateApiKeyRequest(label=label, expires_in=expires_in),
                m.ApiKeyCreated,
            )
        )

    def create_shared_secret(self, principal: str, *, label: str = "",
                             expires_in: int | None = None) -> m.SharedSecretCreated:
        """Issue a shared secret for hmac-sha256 request signatures (shown only once)."""
        return self._call(_Op("POST", f"/v1/principals/{_q(principal)}/shared-secrets",
                              m.CreateApiKeyRequest(label=label, expires_in=expires_in),
                              m.SharedSecretCreated))

    def add_certificate(
        self,
        principal: str,
        *,
        match: str | None = None,
        certificate: str | None = None,
        label: str = "",
        expires_in: int | None = None,
    ) -> m.CredentialInfo:
        """Map client certificates to the principal (a match rule or a PEM certificate)."""
        return self._call(
            _Op(
                "POST",
                f"/v1/principals/{_q(principal)}/certificates",
                m.AddCertificateRequest(
                    match=match, certificate=certificate, label=label, expires_in=expires_in
                ),
                m.CredentialInfo,
            )
        )

    def list_credentials(self, principal: str) -> list[m.CredentialInfo]:
        """A principal's credentials."""
        return self._call(
            _Op("GET", f"/v1/principals/{_q(principal)}/credentials", None, list[m.CredentialInfo])
        )

    def revoke_credential(self, principal: str, credential: str) -> m.CredentialInfo:
        """Revoke a credential (refused from the next request on)."""
        return self._call(
            _Op(
                "POST",
                f"/v1/principals/{_q(principal)}/credentials/{_q(credential)}/revoke",
                None,
                m.CredentialInfo,
            )
        )

    def put_policy(self, name: str, text: str, *, description: str = "") -> m.PolicyInfo:
        """Create or replace a Cedar policy (validated by the server)."""
        return self._call(
            _Op(
                "PUT",
                f"/v1/policies/{_q(name)}",
                m.PutPolicyRequest(text=text, description=description),
                m.PolicyInfo,
            )
        )

    def get_policy(self, name: str) -> m.PolicyInfo:
        """One policy."""
        return self._call(_Op("GET", f"/v1/policies/{_q(name)}", None, m.PolicyInfo))

    def list_policies(self) -> list[m.PolicyInfo]:
        """Every policy."""
        return self._call(_Op("GET", "/v1/policies", None, list[m.PolicyInfo]))

    def delete_policy(self, name: str) -> None:
        """Delete a policy."""
        self._call(_Op("DELETE", f"/v1/policies/{_q(name)}", None, None))

    def test_policy(
        self,
        principal: str,
        action: str,
        *,
        key: str | None = None,
        context: Mapping[str, str] | None = None,
        source: str = "signature",
        grant: m.GrantFactsRequest | None = None,
    ) -> m.PolicyTestResult:
        """Would ``principal`` be allowed ``action`` on ``key``? The result says which statements decided."""
        return self._call(
            _Op(
                "POST",
                "/v1/policy-test",
                m.TestPolicyRequest(
                    principal=principal,
                    action=action,
                    key=key,
                    context=None if context is None else dict(context),
                    source=source,
                    grant=grant,
                ),
                m.PolicyTestResult,
            )
        )


class AsyncClient:
    """Asynchronous client with the same operations as :class:`Client`."""

    def __init__(self, addr: str | None = None, *, token: str | None = None,
                 principal: str | None = None, key_file: str | None = None,
                 signing_key: SigningKey | None = None,
                 cert: tuple[str, str] | None = None,
                 timeout: float = 10.0, transport: httpx.AsyncBaseTransport | None = None,
                 verify: bool | str = True) -> None:
        auth = _signature_auth(principal, key_file, signing_key, token)
        self.addr, headers = _settings(addr, token, auth)
        self._http = httpx.AsyncClient(base_url=self.addr, headers=headers, timeout=timeout,
                                       auth=auth, transport=transport, verify=_tls(verify, cert))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close connections."""
        await self._http.aclose()

    async def _call(self, op: _Op[T]) -> T:
        headers = {"Content-Type": "application/json"} if op.body is not None else None
        try:
            response = await self._http.request(op.method, op.path, content=_content(op),
                                                params=op.params, headers=headers)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.addr}: {exc}") from exc
        return _result(op, response)

    # -- keys ----------------------------------------------------------------------------
    async def create_key(self, name: str, *, spec: str = "aes-256-gcm", description: str = "",
                         rotation_period: int | None = None, derivable: bool = False,
                         tags: Sequence[str] = ()) -> m.KeyInfo:
        """Create a key (``rotation_period`` in seconds; ``tags`` for policies to match)."""
        return await self._call(_Ops.create_key(
            name, spec=spec, description=description, rotation_period=rotation_period,
            derivable=derivable, tags=tags))

    async def list_keys(self, *, limit: int = 100, after: str | None = None) -> m.KeyList:
        """One page of keys."""
        return await self._call(_Ops.list_keys(limit=limit, after=after))

    async def describe_key(self, key: str) -> m.KeyInfo:
        """A key's metadata, by id, name or alias."""
        return await self._call(_Ops.describe_key(key))

    async def update_key(self, key: str, *, description: str | None = None,
                         rotation_period: int | None = None,
                         min_decryption_version: int | None = None,
                         tags: Sequence[str] | None = None) -> m.KeyInfo:
        """Change settings (``rotation_period=0`` turns scheduled rotation off; ``tags``
        replaces the set)."""
        return await self._call(_Ops.update_key(
            key, description=description, rotation_period=rotation_period,
            min_decryption_version=min_decryption_version, tags=tags))

    async def rotate_key(self, key: str) -> m.KeyInfo:
        """Add a new version."""
        return await self._call(_Ops.key_action(key, "rotate"))

    async def disable_key(self, key: str) -> m.KeyInfo:
        """Disable a key."""
        return await self._call(_Ops.key_action(key, "disable"))

    async def enable_key(self, key: str) -> m.KeyInfo:
        """Enable a key."""
        return await self._call(_Ops.key_action(key, "enable"))

    async def schedule_key_deletion(self, key: str, *, days: int = 30) -> m.KeyInfo:
        """Schedule destruction after ``days`` (7 to 30)."""
        return await self._call(_Ops.key_action(
            key, "schedule-deletion", m.ScheduleDeletionRequest(days=days)))

    async def cancel_key_deletion(self, key: str) -> m.KeyInfo:
        """Cancel a scheduled deletion."""
        return await self._call(_Ops.key_action(key, "cancel-deletion"))

    async def create_alias(self, alias: str, key: str) -> m.AliasInfo:
        """Point an alias at a key."""
        return await self._call(_Ops.create_alias(alias, key))

    async def list_aliases(self, key: str | None = None) -> list[m.AliasInfo]:
        """All aliases, or one key's."""
        return await self._call(_Ops.list_aliases(key))

    async def delete_alias(self, alias: str) -> None:
        """Delete an alias."""
        await self._call(_Ops.delete_alias(alias))

    # -- crypto --------------------------------------------------------------------------
    async def encrypt(self, key: str, plaintext: bytes, *,
                      context: Mapping[str, str] | None = None) -> m.EncryptResult:
        """Encrypt under the key's latest version."""
        return await self._call(_Ops.encrypt(key, plaintext, context))

    async def decrypt(self, ciphertext: bytes, *,
                      context: Mapping[str, str] | None = None) -> m.DecryptResult:
        """Decrypt a native ciphertext."""
        return await self._call(_Ops.decrypt(ciphertext, context))

    async def re_encrypt(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None,
                         destination_key: str | None = None,
                         destination_context: Mapping[str, str] | None = None
                         ) -> m.ReEncryptResult:
        """Re-encrypt to the latest version or another key, inside the server."""
        return await self._call(_Ops.re_encrypt(
            ciphertext, context=context, destination_key=destination_key,
            destination_context=destination_context))

    async def generate_data_key(self, key: str, *, size: int = 32,
                                context: Mapping[str, str] | None = None,
                                include_plaintext: bool = True) -> m.DataKey:
        """A fresh data key of 16, 32 or 64 bytes."""
        return await self._call(_Ops.generate_data_key(
            key, size=size, context=context, include_plaintext=include_plaintext))

    async def batch_encrypt(self, key: str,
                            items: Sequence[tuple[bytes, Mapping[str, str] | None]]
                            ) -> m.BatchResult:
        """Encrypt up to 1,000 ``(plaintext, context)`` items."""
        return await self._call(_Ops.batch_encrypt(key, items))

    async def batch_decrypt(self, items: Sequence[tuple[bytes, Mapping[str, str] | None]]
                            ) -> m.BatchResult:
        """Decrypt up to 1,000 ``(ciphertext, context)`` items."""
        return await self._call(_Ops.batch_decrypt(items))

    async def sign(self, key: str, message: bytes, *,
                   message_type: m.MessageType = "raw") -> m.SignResult:
        """Sign a message (or a SHA-256 digest with ``message_type="digest"``)."""
        return await self._call(_Ops.sign(key, message, message_type))

    async def verify(self, key: str, message: bytes, signature: bytes, *,
                     message_type: m.MessageType = "raw",
                     key_version: int | None = None) -> m.VerifyResult:
        """Check a signature."""
        return await self._call(_Ops.verify(
            key, message, signature, message_type, key_version))

    async def get_public_key(self, key: str, *, version: int | None = None) -> m.PublicKey:
        """A signing key's public key (PEM and JWK)."""
        return await self._call(_Ops.get_public_key(key, version))

    async def mac(self, key: str, message: bytes) -> m.MacResult:
        """HMAC-SHA256 tag."""
        return await self._call(_Ops.mac(key, message))

    async def verify_mac(self, key: str, message: bytes, mac: bytes, *,
                         key_version: int | None = None) -> m.VerifyResult:
        """Check an HMAC tag."""
        return await self._call(_Ops.verify_mac(
            key, message, mac, key_version))

    async def derive(self, key: str, context: Mapping[str, str], *, length: int = 32,
                     salt: bytes | None = None, key_version: int | None = None) -> m.DerivedKey:
        """HKDF-SHA256 from a derivable key."""
        return await self._call(_Ops.derive(
            key, context, length=length, salt=salt, key_version=key_version))

    async def random(self, n: int = 32) -> m.RandomResult:
        """Random bytes from the server."""
        return await self._call(_Ops.random(n))

    # -- audit ---------------------------------------------------------------------------
    async def audit_checkpoint(self, *, now: bool = False) -> m.AuditCheckpoint:
        """The latest signed checkpoint (``now=True``: make one first)."""
        return await self._call(_Ops.audit_checkpoint(now=now))

    async def audit_search(self, *, principal: str | None = None, key: str | None = None,
                           grant: str | None = None, type: str | None = None,
                           since: str | None = None, until: str | None = None,
                           after: int | None = None, limit: int = 100) -> m.AuditEventPage:
        """Audit events matching every given filter (times are RFC 3339 UTC strings)."""
        return await self._call(_Ops.audit_search(
            principal=principal, key=key, grant=grant, type=type, since=since, until=until,
            after=after, limit=limit))

    async def audit_inclusion_proof(self, index: int, *, size: int | None = None
                                    ) -> m.InclusionProof:
        """RFC 6962 inclusion proof of an event."""
        return await self._call(_Ops.audit_inclusion_proof(index, size))

    async def audit_consistency_proof(self, old_size: int, new_size: int | None = None
                                      ) -> m.ConsistencyProof:
        """RFC 6962 consistency proof between two tree sizes."""
        return await self._call(_Ops.audit_consistency_proof(old_size, new_size))

    async def audit_export(self, out: BinaryIO, *, since: int = 0) -> int:
        """Stream the audit export (JSON Lines) into ``out``; returns the bytes written."""
        written = 0
        try:
            async with self._http.stream("GET", "/v1/audit/export",
                                         params={"since": str(since)}) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _result(_Op("GET", "", None, None), response)
                async for chunk in response.aiter_bytes():
                    out.write(chunk)
                    written += len(chunk)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.addr}: {exc}") from exc
        return written

    async def audit_hash(self, value: str) -> m.AuditDigest:
        """The keyed digest the log records in place of ``value``."""
        return await self._call(_Ops.audit_hash(value))

    async def audit_key(self) -> m.AuditKey:
        """The audit log's origin and verifier key."""
        return await self._call(_Ops.audit_key())
    # -- principals, credentials and policies ------------------------------------------
    async def whoami(self) -> m.WhoAmI:
        """The authenticated caller."""
        return await self._call(_Op("GET", "/v1/whoami", None, m.WhoAmI))

    async def create_principal(
        self, principal: str, *, display_name: str = "", tags: Sequence[str] = ()
    ) -> m.PrincipalInfo:
        """Create a principal (a service or a person)."""
        return await self._call(
            _Op(
                "POST",
                "/v1/principals",
                m.CreatePrincipalRequest(id=principal, display_name=display_name, tags=list(tags)),
                m.PrincipalInfo,
            )
        )

    async def list_principals(
        self, *, limit: int = 100, after: str | None = None
    ) -> m.PrincipalList:
        """One page of principals."""
        return await self._call(
            _Op(
                "GET",
                "/v1/principals",
                None,
                m.PrincipalList,
                {"limit": str(limit)} | ({"after": after} if after else {}),
            )
        )

    async def describe_principal(self, principal: str) -> m.PrincipalInfo:
        """A principal with its credentials."""
        return await self._call(
            _Op("GET", f"/v1/principals/{_q(principal)}", None, m.PrincipalInfo)
        )

    async def update_principal(
        self, principal: str, *, display_name: str | None = None, tags: Sequence[str] | None = None
    ) -> m.PrincipalInfo:
        """Change display name or tags (``tags`` replaces the set)."""
        return await self._call(
            _Op(
                "PATCH",
                f"/v1/principals/{_q(principal)}",
                m.UpdatePrincipalRequest(
                    display_name=display_name, tags=None if tags is None else list(tags)
                ),
                m.PrincipalInfo,
            )
        )

    async def disable_principal(self, principal: str) -> m.PrincipalInfo:
        """Refuse all of a principal's credentials."""
        return await self._call(
            _Op("POST", f"/v1/principals/{_q(principal)}/disable", None, m.PrincipalInfo)
        )

    async def enable_principal(self, principal: str) -> m.PrincipalInfo:
        """Accept a principal's credentials again."""
        return await self._call(
            _Op("POST", f"/v1/principals/{_q(principal)}/enable", None, m.PrincipalInfo)
        )

    async def delete_principal(self, principal: str) -> None:
        """Delete a principal and its credentials."""
        await self._call(_Op("DELETE", f"/v1/principals/{_q(principal)}", None, None))

    async def add_public_key(
        self, principal: str, public_key: str, *, label: str = "", expires_in: int | None = None
    ) -> m.CredentialInfo:
        """Register a public key (PEM or JWK JSON) for signed requests."""
        return await self._call(
            _Op(
                "POST",
                f"/v1/principals/{_q(principal)}/keys",
                m.AddPublicKeyRequest(public_key=public_key, label=label, expires_in=expires_in),
                m.CredentialInfo,
            )
        )

    async def create_api_key(
        self, principal: str, *, label: str = "", expires_in: int | None = None
    ) -> m.ApiKeyCreated:
        """Issue an API key (``result.api_key`` is shown only once)."""
        return await self._call(
            _Op(
                "POST",
                f"/v1/principals/{_q(principal)}/api-keys",
                m.CreateApiKeyRequest(label=label, expires_in=expires_in),
                m.ApiKeyCreated,
            )
        )

    async def create_shared_secret(self, principal: str, *, label: str = "",
                             expires_in: int | None = None) -> m.SharedSecretCreated:
        """Issue a shared secret for hmac-sha256 request signatures (shown only once)."""
        return await self._call(_Op("POST", f"/v1/principals/{_q(principal)}/shared-secrets",
                              m.CreateApiKeyRequest(label=label, expires_in=expires_in),
                              m.SharedSecretCreated))

    async def add_certificate(
        self,
        principal: str,
        *,
        match: str | None = None,
        certificate: str | None = None,
        label: str = "",
        expires_in: int | None = None,
    ) -> m.CredentialInfo:
        """Map client certificates to the principal (a match rule or a PEM certificate)."""
        return await self._call(
            _Op(
                "POST",
                f"/v1/principals/{_q(principal)}/certificates",
                m.AddCertificateRequest(
                    match=match, certificate=certificate, label=label, expires_in=expires_in
                ),
                m.CredentialInfo,
            )
        )

    async def list_credentials(self, principal: str) -> list[m.CredentialInfo]:
        """A principal's credentials."""
        return await self._call(
            _Op("GET", f"/v1/principals/{_q(principal)}/credentials", None, list[m.CredentialInfo])
        )

    async def revoke_credential(self, principal: str, credential: str) -> m.CredentialInfo:
        """Revoke a credential (refused from the next request on)."""
        return await self._call(
            _Op(
                "POST",
                f"/v1/principals/{_q(principal)}/credentials/{_q(credential)}/revoke",
                None,
                m.CredentialInfo,
            )
        )

    async def put_policy(self, name: str, text: str, *, description: str = "") -> m.PolicyInfo:
        """Create or replace a Cedar policy (validated by the server)."""
        return await self._call(
            _Op(
                "PUT",
                f"/v1/policies/{_q(name)}",
                m.PutPolicyRequest(text=text, description=description),
                m.PolicyInfo,
            )
        )

    async def get_policy(self, name: str) -> m.PolicyInfo:
        """One policy."""
        return await self._call(_Op("GET", f"/v1/policies/{_q(name)}", None, m.PolicyInfo))

    async def list_policies(self) -> list[m.PolicyInfo]:
        """Every policy."""
        return await self._call(_Op("GET", "/v1/policies", None, list[m.PolicyInfo]))

    async def delete_policy(self, name: str) -> None:
        """Delete a policy."""
        await self._call(_Op("DELETE", f"/v1/policies/{_q(name)}", None, None))

    async def test_policy(
        self,
        principal: str,
        action: str,
        *,
        key: str | None = None,
        context: Mapping[str, str] | None = None,
        source: str = "signature",
        grant: m.GrantFactsRequest | None = None,
    ) -> m.PolicyTestResult:
        """Would ``principal`` be allowed ``action`` on ``key``? The result says which statements decided."""
        return await self._call(
            _Op(
                "POST",
                "/v1/policy-test",
                m.TestPolicyRequest(
                    principal=principal,
                    action=action,
                    key=key,
                    context=None if context is None else dict(context),
                    source=source,
                    grant=grant,
                ),
                m.PolicyTestResult,
            )
        )
