"""The Python SDK: :class:`Client` and :class:`AsyncClient` for the keygrants HTTP API.

Both read ``KEYGRANTS_ADDR`` (default ``http://127.0.0.1:8650``) and ``KEYGRANTS_TOKEN`` from
the environment unless given ``addr=`` / ``token=``, and ``KEYGRANTS_GRANT`` /
``KEYGRANTS_DPOP_KEY_FILE`` unless given ``grant=`` or ``dpop_key=``. Results are the typed structs of
:mod:`keygrants.models`; failures raise the typed error tree of :mod:`keygrants.errors`
(rebuilt from the server's error ``code``). A request that could not be sent (no
connection) raises :class:`~keygrants.errors.ServerUnreachable`; one that was sent but got no
answer (a read timeout, a dropped connection) raises its subclass
:class:`~keygrants.errors.NoResponse`, since the server may have carried it out. Addresses are
checked when a client is built (:mod:`keygrants.client._connection`): ``https://``, or
``http://`` to a loopback host unless the caller opts in.

Each operation is described once, as an :class:`_Op` built by a method of :class:`_Ops`; the
two clients differ only in how they send it. Arguments are checked there, before anything is
sent: binary ones (``plaintext``, ``ciphertext``, ``message``, ``signature``, ``mac``,
``salt``) must be ``bytes`` (``bytearray`` and ``memoryview`` are taken too), else
``TypeError``, since the API would read a ``str`` as base64 and act on other bytes; a key
reference (``key``, ``destination_key``, an alias) that is empty, contains ``/``, ``?`` or
``#``, or is ``.`` or ``..`` raises ``ValueError``; any other is percent-encoded into the path.

Grants: a cryptographic operation given ``grant=<token>`` (or the client's default grant)
sends it as ``Keygrants-Grant`` next to the caller's own credentials. With a proof key
(``dpop_key=``), every attempt of such a request also carries a fresh RFC 9449 ``DPoP`` proof
bound to the request's method, absolute URL and the token; a ``401 use_dpop_nonce`` answer is
retried once with the server's ``DPoP-Nonce``, which is then used for later proofs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, Final, Generic, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from keygrants import models as m
from keygrants.client._connection import (
    INSECURE_HTTP_ENV,
    insecure_http_allowed,
    off_network,
    redact_address,
    server_url,
    tls_verify,
)
from keygrants.crypto.signing import SigningKey
from keygrants.errors import (
    InvalidRequest,
    KeygrantsError,
    NoResponse,
    ServerUnreachable,
    error_from_code,
)
from keygrants.grants.dpop import make_proof

__all__ = ["DEFAULT_ADDR", "AsyncClient", "Client", "load_dpop_key"]

DEFAULT_ADDR: Final = "http://127.0.0.1:8650"
ADDR_ENV: Final = "KEYGRANTS_ADDR"
TOKEN_ENV: Final = "KEYGRANTS_TOKEN"
PRINCIPAL_ENV: Final = "KEYGRANTS_PRINCIPAL"
KEY_FILE_ENV: Final = "KEYGRANTS_KEY_FILE"
GRANT_ENV: Final = "KEYGRANTS_GRANT"
DPOP_KEY_FILE_ENV: Final = "KEYGRANTS_DPOP_KEY_FILE"
GRANT_HEADER: Final = "Keygrants-Grant"
T = TypeVar("T")
_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class _Op(Generic[T]):
    method: str
    path: str
    body: Any
    result: Any  # the msgspec decode type of T (None for no content)
    params: dict[str, str] | None = None
    grant: str | None = None  # the grant token given for this call ("": none)
    default_grant: bool = False  # the client's default grant applies when ``grant`` is None
    pop_token: str | None = None  # a token to prove possession for without presenting it


def _crypto(method: str, path: str, body: Any, result: Any, grant: str | None,
            params: dict[str, str] | None = None) -> _Op[Any]:
    """An operation that may present a grant (the client's default one unless given)."""
    return _Op(method, path, body, result, params, grant=grant, default_grant=True)


def _check_ref(ref: str) -> str:
    """Refuse a reference that is empty or would change a request path (``/``, ``?``, ``#``,
    ``.``, ``..``), naming it as given.

    Raises:
        ValueError: such a reference.
    """
    if not ref or "/" in ref or ref in (".", "..") or "?" in ref or "#" in ref:
        raise ValueError(f"invalid key or alias reference {ref!r}")
    return ref


def _q(segment: str) -> str:
    """A key reference (or other id) as one path segment, percent-encoded: the server decodes
    the path once, so ``a%2Fb`` must reach it as ``a%252Fb`` to mean what the caller typed.

    Raises:
        ValueError: see :func:`_check_ref`.
    """
    return quote(_check_ref(segment), safe="")


def _bytes(value: object, name: str, *, base64_text: bool = False) -> bytes:
    """``value`` (bytes, bytearray or memoryview) as bytes.

    Anything else is refused before a request is made: msgspec would send a ``str`` as it is,
    and the server, reading every binary field as base64, would encrypt, sign or MAC other
    bytes than the caller's (or fail with a puzzling ``malformed_body``). ``base64_text``: a
    ``str`` given here is most likely the base64 text of the bytes (a ciphertext, signature or
    tag copied from the CLI), which the hint says.

    Raises:
        TypeError: ``value`` is not bytes-like, e.g. ``plaintext must be bytes, not str``.
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    hint = ""
    if isinstance(value, str):
        hint = ("; base64-decode it first (base64.b64decode)" if base64_text
                else "; encode it first (e.g. text.encode())")
    raise TypeError(f"{name} must be bytes, not {type(value).__name__}{hint}")


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
    def describe_key(key: str, grant: str | None = None) -> _Op[m.KeyInfo]:
        return _crypto("GET", f"/v1/keys/{_q(key)}", None, m.KeyInfo, grant)

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
    def encrypt(key: str, plaintext: bytes, context: Mapping[str, str] | None,
                grant: str | None = None) -> _Op[m.EncryptResult]:
        body = m.EncryptRequest(plaintext=_bytes(plaintext, "plaintext"),
                                context=dict(context) if context else None)
        return _crypto("POST", f"/v1/keys/{_q(key)}/encrypt", body, m.EncryptResult, grant)

    @staticmethod
    def decrypt(ciphertext: bytes, context: Mapping[str, str] | None,
                grant: str | None = None) -> _Op[m.DecryptResult]:
        body = m.DecryptRequest(ciphertext=_bytes(ciphertext, "ciphertext", base64_text=True),
                                context=dict(context) if context else None)
        return _crypto("POST", "/v1/decrypt", body, m.DecryptResult, grant)

    @staticmethod
    def re_encrypt(ciphertext: bytes, *, context: Mapping[str, str] | None,
                   destination_key: str | None,
                   destination_context: Mapping[str, str] | None,
                   grant: str | None = None) -> _Op[m.ReEncryptResult]:
        if destination_key is not None:  # "" is no key: not "the source key", as None is
            _check_ref(destination_key)
        body = m.ReEncryptRequest(
            ciphertext=_bytes(ciphertext, "ciphertext", base64_text=True),
            context=dict(context) if context else None, destination_key=destination_key,
            destination_context=None if destination_context is None else dict(destination_context))
        return _crypto("POST", "/v1/re-encrypt", body, m.ReEncryptResult, grant)

    @staticmethod
    def generate_data_key(key: str, *, size: int, context: Mapping[str, str] | None,
                          include_plaintext: bool, grant: str | None = None) -> _Op[m.DataKey]:
        body = m.DataKeyRequest(bytes=size, context=dict(context) if context else None,
                                include_plaintext=include_plaintext)
        return _crypto("POST", f"/v1/keys/{_q(key)}/data-key", body, m.DataKey, grant)

    @staticmethod
    def batch_encrypt(key: str, items: Sequence[tuple[bytes, Mapping[str, str] | None]],
                      grant: str | None = None) -> _Op[m.BatchResult]:
        body = m.BatchEncryptRequest(items=[
            m.BatchEncryptItem(plaintext=_bytes(p, f"plaintext of items[{i}]"),
                               context=dict(c) if c else None)
            for i, (p, c) in enumerate(items)])
        return _crypto("POST", f"/v1/keys/{_q(key)}/encrypt-batch", body, m.BatchResult, grant)

    @staticmethod
    def batch_decrypt(items: Sequence[tuple[bytes, Mapping[str, str] | None]],
                      grant: str | None = None) -> _Op[m.BatchResult]:
        body = m.BatchDecryptRequest(items=[
            m.BatchDecryptItem(ciphertext=_bytes(ct, f"ciphertext of items[{i}]", base64_text=True),
                               context=dict(c) if c else None)
            for i, (ct, c) in enumerate(items)])
        return _crypto("POST", "/v1/decrypt-batch", body, m.BatchResult, grant)

    @staticmethod
    def sign(key: str, message: bytes, message_type: m.MessageType,
             grant: str | None = None) -> _Op[m.SignResult]:
        body = m.SignRequest(message=_bytes(message, "message"), message_type=message_type)
        return _crypto("POST", f"/v1/keys/{_q(key)}/sign", body, m.SignResult, grant)

    @staticmethod
    def verify(key: str, message: bytes, signature: bytes, message_type: m.MessageType,
               key_version: int | None, grant: str | None = None) -> _Op[m.VerifyResult]:
        body = m.VerifyRequest(message=_bytes(message, "message"),
                               signature=_bytes(signature, "signature", base64_text=True),
                               message_type=message_type, key_version=key_version)
        return _crypto("POST", f"/v1/keys/{_q(key)}/verify", body, m.VerifyResult, grant)

    @staticmethod
    def get_public_key(key: str, version: int | None, grant: str | None = None) -> _Op[m.PublicKey]:
        params = {"version": str(version)} if version is not None else None
        return _crypto("GET", f"/v1/keys/{_q(key)}/public-key", None, m.PublicKey, grant, params)

    @staticmethod
    def mac(key: str, message: bytes, grant: str | None = None) -> _Op[m.MacResult]:
        return _crypto("POST", f"/v1/keys/{_q(key)}/mac",
                       m.MacRequest(message=_bytes(message, "message")), m.MacResult, grant)

    @staticmethod
    def verify_mac(key: str, message: bytes, mac: bytes, key_version: int | None,
                   grant: str | None = None) -> _Op[m.VerifyResult]:
        body = m.VerifyMacRequest(message=_bytes(message, "message"),
                                  mac=_bytes(mac, "mac", base64_text=True), key_version=key_version)
        return _crypto("POST", f"/v1/keys/{_q(key)}/verify-mac", body, m.VerifyResult, grant)

    @staticmethod
    def derive(key: str, context: Mapping[str, str], *, length: int, salt: bytes | None,
               key_version: int | None, grant: str | None = None) -> _Op[m.DerivedKey]:
        body = m.DeriveRequest(context=dict(context), length=length,
                               salt=None if salt is None else _bytes(salt, "salt"),
                               key_version=key_version)
        return _crypto("POST", f"/v1/keys/{_q(key)}/derive", body, m.DerivedKey, grant)

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
        if not isinstance(value, str):  # bytes would be sent, and hashed, as their base64 text
            raise TypeError(f"value must be str, not {type(value).__name__}")
        return _Op("POST", "/v1/audit/hash", m.AuditHashRequest(value=value), m.AuditDigest)

    @staticmethod
    def audit_key() -> _Op[m.AuditKey]:
        return _Op("GET", "/v1/audit/key", None, m.AuditKey)

    # -- grants ------------------------------------------------------------------------------
    @staticmethod
    def create_grant(key: str, grantee: str, operations: Sequence[str], *,
                     context_equals: Mapping[str, str] | None, context_subset: Mapping[str, str] | None,
                     ttl: int | None, not_before: datetime | None, max_uses: int | None,
                     audiences: Sequence[str], dpop_jkt: str | None, x5t_s256: str | None,
                     name: str | None, retiring_principal: str | None, justification: str | None,
                     grant: str | None) -> _Op[m.GrantCreated]:
        body = m.CreateGrantRequest(
            key=key, grantee=grantee, operations=list(operations),
            context_equals=None if context_equals is None else dict(context_equals),
            context_subset=None if context_subset is None else dict(context_subset),
            ttl=ttl, not_before=not_before, max_uses=max_uses, audiences=list(audiences),
            dpop_jkt=dpop_jkt, x5t_s256=x5t_s256, name=name,
            retiring_principal=retiring_principal, justification=justification)
        # a sub-grant only with a grant given for this call: delegation is never implicit
        return _Op("POST", "/v1/grants", body, m.GrantCreated, grant=grant)

    @staticmethod
    def list_grants(*, key: str | None, grantee: str | None, retiring_principal: str | None,
                    state: str | None, limit: int, after: str | None) -> _Op[m.GrantList]:
        params = {k: v for k, v in (("key", key), ("grantee", grantee),
                                    ("retiring_principal", retiring_principal), ("state", state),
                                    ("limit", str(limit)), ("after", after)) if v is not None}
        return _Op("GET", "/v1/grants", None, m.GrantList, params)

    @staticmethod
    def describe_grant(grant_id: str) -> _Op[m.GrantInfo]:
        return _Op("GET", f"/v1/grants/{_q(grant_id)}", None, m.GrantInfo)

    @staticmethod
    def grant_token(grant_id: str) -> _Op[m.GrantCreated]:
        return _Op("POST", f"/v1/grants/{_q(grant_id)}/token", None, m.GrantCreated)

    @staticmethod
    def grant_action(grant_id: str, action: str, note: str | None = None) -> _Op[m.GrantInfo]:
        """retire, revoke, approve or reject (the last two with an optional note)."""
        body = m.GrantDecisionRequest(note=note) if action in ("approve", "reject") else None
        return _Op("POST", f"/v1/grants/{_q(grant_id)}/{action}", body, m.GrantInfo)

    @staticmethod
    def revoke_all_grants(*, principal: str | None, key: str | None) -> _Op[m.RevokeAllResult]:
        return _Op("POST", "/v1/revoke-all", m.RevokeAllRequest(principal=principal, key=key),
                   m.RevokeAllResult)

    @staticmethod
    def exchange_grant(subject_token: str, *, scope: str | Sequence[str] | None,
                       audience: Sequence[str] | None, context_equals: Mapping[str, str] | None,
                       context_subset: Mapping[str, str] | None, ttl: int | None,
                       max_uses: int | None, dpop_jkt: str | None) -> _Op[m.TokenExchangeResult]:
        subject_token = _clean_token(subject_token, "subject token")
        body = m.TokenExchangeRequest(
            subject_token=subject_token,
            scope=scope if scope is None or isinstance(scope, str) else " ".join(scope),
            audience=None if audience is None else list(audience),
            context_equals=None if context_equals is None else dict(context_equals),
            context_subset=None if context_subset is None else dict(context_subset),
            ttl=ttl, max_uses=max_uses, dpop_jkt=dpop_jkt)
        # the subject token is proven (DPoP) like a presented grant, but travels in the body
        return _Op("POST", "/v1/token-exchange", body, m.TokenExchangeResult,
                   pop_token=subject_token)

    @staticmethod
    def rotate_issuer_key() -> _Op[m.IssuerKeyInfo]:
        return _Op("POST", "/v1/issuer/rotate", None, m.IssuerKeyInfo)

    @staticmethod
    def revocations(since: int, limit: int) -> _Op[m.RevocationFeed]:
        return _Op("GET", "/v1/revocations", None, m.RevocationFeed,
                   {"since": str(since), "limit": str(limit)})

    @staticmethod
    def jwks() -> _Op[dict[str, Any]]:
        return _Op("GET", "/.well-known/jwks.json", None, dict[str, Any])


def _credentials(token: str | None, principal: str | None,
                 key_file: str | os.PathLike[str] | None, signing_key: SigningKey | None
                 ) -> tuple[str | None, httpx.Auth | None]:
    """The bearer token, or the RFC 9421 request signature, a client sends.

    The arguments decide when any of them is given (``token=""``: no token); only when none
    is does the environment (``KEYGRANTS_TOKEN``, ``KEYGRANTS_PRINCIPAL`` +
    ``KEYGRANTS_KEY_FILE``). A token and a signing key from the same place are refused: one
    of them would be dropped, and the client would act as another identity than the caller
    believes.

    Raises:
        InvalidRequest: the key file cannot be read.
        ValueError: a token and a signing key both given (or both set in the environment), a
            principal without a key or the other way round, a file that holds no usable key,
            or a token with spaces, control or non-ASCII characters.
    """
    if token is None and principal is None and key_file is None and signing_key is None:
        signing_vars = [name for name in (PRINCIPAL_ENV, KEY_FILE_ENV) if os.environ.get(name)]
        if (os.environ.get(TOKEN_ENV) or "").strip() and signing_vars:
            raise ValueError(f"both {TOKEN_ENV} and {' and '.join(signing_vars)} are set: a "
                             "token and a signing key are two identities; unset one (or pass "
                             "token= or principal= with key_file= to choose)")
        token = os.environ.get(TOKEN_ENV) or None
        principal = os.environ.get(PRINCIPAL_ENV) or None
        key_file = os.environ.get(KEY_FILE_ENV) or None
    elif (token or "").strip() and not (principal is None and key_file is None
                                        and signing_key is None):
        raise ValueError("give either token= or a signing key (principal= with key_file= or "
                         "signing_key=), not both: they are two identities")
    token = _clean_token(token, "token") if token and token.strip() else None
    return token, _signature_auth(principal, key_file, signing_key)


def _signature_auth(principal: str | None, key_file: str | os.PathLike[str] | None,
                    signing_key: SigningKey | None) -> httpx.Auth | None:
    """RFC 9421 request signing when a principal and its key are given.

    The key file holds a PEM private key (Ed25519 or ECDSA P-256; the keyid is
    ``<principal>/<JWK thumbprint>``) or a shared secret ``kg_ss_…`` (hmac-sha256; the keyid is
    ``<principal>/ss_…``). A file that group or others may access is used, with a
    ``UserWarning`` (:func:`keygrants.client._signing.private_file_problem`).

    Raises:
        InvalidRequest: the key file cannot be read.
        ValueError: a principal without a key or the other way round, or a file that holds no
            usable key.
    """
    from keygrants.auth.credentials import SHARED_SECRET_PREFIX, jwk_thumbprint, parse_shared_secret
    from keygrants.client._signing import (
        MAX_KEY_FILE,
        SignatureAuth,
        load_signing_key,
        warn_if_exposed,
    )

    if key_file is None and signing_key is None and principal is None:
        return None
    if not principal or (key_file is None and signing_key is None):
        raise ValueError("request signing needs both a principal (KEYGRANTS_PRINCIPAL) and its "
                         "key file (KEYGRANTS_KEY_FILE)")
    if signing_key is None:
        assert key_file is not None
        try:
            with open(key_file, "rb") as f:
                head = f.read(len(SHARED_SECRET_PREFIX))
            if head == SHARED_SECRET_PREFIX.encode():
                with open(key_file) as f:
                    parsed = parse_shared_secret(f.read(MAX_KEY_FILE))
                if parsed is None:
                    raise ValueError(f"{os.fspath(key_file)} does not hold a well-formed shared "
                                     "secret")
                warn_if_exposed(key_file)
                return SignatureAuth(f"{principal}/{parsed[0]}", parsed[1])
            signing_key = load_signing_key(key_file)
        except OSError as exc:
            raise InvalidRequest(f"cannot read the key file {os.fspath(key_file)}: "
                                 f"{exc.strerror or exc}") from None
    keyid = f"{principal}/{jwk_thumbprint(signing_key.public_key().jwk())}"
    return SignatureAuth(keyid, signing_key)


def _base_url(addr: str | None, *, own_transport: bool, allow_insecure_http: bool) -> str:
    """The server address (``KEYGRANTS_ADDR``, then the default), checked as
    :mod:`keygrants.client._connection` says.

    Raises:
        ValueError: a missing or foreign scheme, a malformed address, or ``http://`` to a host
            that is not loopback without the opt-in.
    """
    return server_url(addr or os.environ.get(ADDR_ENV) or DEFAULT_ADDR,
                      allow_insecure_http=insecure_http_allowed(allow_insecure_http),
                      own_transport=own_transport,
                      opt_in=f"pass allow_insecure_http=True (or set {INSECURE_HTTP_ENV}=1)")


def _headers(token: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": "keygrants-python"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


# Failures before any byte of the request reached the server: it did nothing.
_NOTHING_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _transport_failure(addr: str, method: str, exc: httpx.TransportError) -> ServerUnreachable:
    """The error for a request that got no HTTP answer: :class:`ServerUnreachable` when no
    connection was made (nothing was sent), else :class:`NoResponse`, since the server may
    have carried the request out and a blind retry could do it twice (a second grant,
    rotation or API key)."""
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, _NOTHING_SENT):
        return ServerUnreachable(f"cannot reach {addr}: {reason}")
    if method in ("GET", "HEAD"):
        return NoResponse(f"the request was sent to {addr} but no answer came ({reason}); it "
                          "only reads, so it can be retried")
    return NoResponse(f"the request was sent to {addr} but no answer came ({reason}): it may "
                      "have taken effect; check before retrying")


def _result(op: _Op[T], response: httpx.Response) -> T:
    if 300 <= response.status_code < 400:  # not followed (credentials stay with the server)
        where = response.headers.get("location", "")[:200]
        raise KeygrantsError(f"HTTP {response.status_code} redirect from the server"
                             + (f" to {where}" if where else "") + ": nothing was done; point "
                             "the client at the server itself (https?)")
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


def _clean_token(token: str, what: str) -> str:
    token = token.strip()
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError(f"the {what} contains spaces, control or non-ASCII characters; check "
                         "how it was copied")
    return token


def _error_code(response: httpx.Response) -> str | None:
    try:
        return str(msgspec.json.decode(response.content)["error"]["code"])
    except (msgspec.DecodeError, KeyError, TypeError):
        return None


def load_dpop_key(path: str | os.PathLike[str]) -> SigningKey:
    """Read a DPoP proof key: a PEM private key file (PKCS#8 Ed25519 or ECDSA P-256).

    A file that group or others may access is read with a ``UserWarning`` (see
    :func:`keygrants.client._signing.private_file_problem`).

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not an unencrypted Ed25519 or P-256 private key.
    """
    from keygrants.client._signing import load_signing_key

    try:
        return load_signing_key(path)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)} is not a DPoP proof key: {exc}") from None


class _GrantPresenter:
    """A client's grant settings: the token a request presents and the DPoP proofs it carries.

    ``grant`` and ``dpop_key`` come from the arguments, or, when neither is given, from
    ``KEYGRANTS_GRANT`` and ``KEYGRANTS_DPOP_KEY_FILE`` (``grant=""``: no default grant and no
    environment). The last ``DPoP-Nonce`` the server sent goes into every later proof.
    """

    def __init__(self, grant: str | None, dpop_key: SigningKey | None) -> None:
        from keygrants.grants.dpop import proof_key_thumbprint

        if grant is None and dpop_key is None:
            grant = os.environ.get(GRANT_ENV) or None
            key_file = os.environ.get(DPOP_KEY_FILE_ENV) or None
            try:
                dpop_key = None if key_file is None else load_dpop_key(key_file)
            except OSError as exc:
                raise InvalidRequest(f"cannot read the DPoP key file {key_file} "
                                     f"({DPOP_KEY_FILE_ENV}): {exc.strerror or exc}") from None
        if dpop_key is not None:
            proof_key_thumbprint(dpop_key)  # ValueError now, not on the first request: RSA keys
        self.grant = _clean_token(grant, "grant token") if grant else None
        self.dpop_key = dpop_key
        self.nonce: str | None = None

    def prepare(self, op: _Op[Any]) -> tuple[dict[str, str], str | None]:
        """The headers of ``op``'s request and the token its DPoP proofs bind (``None``: send
        no proof)."""
        token = op.grant if op.grant is not None else (self.grant if op.default_grant else None)
        headers = {"Content-Type": "application/json"} if op.body is not None else {}
        if token:
            token = headers[GRANT_HEADER] = _clean_token(token, "grant token")
        bound = token or op.pop_token
        return headers, bound if bound and self.dpop_key is not None else None

    def prove(self, request: httpx.Request, token: str) -> None:
        """Add a fresh proof for exactly this request (method and absolute URL, as sent)."""
        assert self.dpop_key is not None
        request.headers["DPoP"] = make_proof(self.dpop_key, method=request.method,
                                             url=str(request.url), access_token=token,
                                             nonce=self.nonce)

    def wants_nonce(self, response: httpx.Response) -> bool:
        """Remember a ``DPoP-Nonce`` from ``response``; whether the request it answers must be
        sent again with it (``401 use_dpop_nonce``)."""
        nonce = response.headers.get("dpop-nonce")
        if not nonce:
            return False
        self.nonce = nonce.strip()
        return response.status_code == 401 and _error_code(response) == "use_dpop_nonce"


class Client:
    """Synchronous client.

    Args:
        addr: server address, ``https://HOST:PORT`` (``KEYGRANTS_ADDR``, default
            ``http://127.0.0.1:8650``); ``http://`` only to a loopback host unless
            ``allow_insecure_http``.
        token: bearer token: an API key or the admin token (``KEYGRANTS_TOKEN``).
        principal: sign every request (RFC 9421) as this principal (``KEYGRANTS_PRINCIPAL``).
        key_file: the principal's PEM private key or shared secret file
            (``KEYGRANTS_KEY_FILE``).
        signing_key: the private key itself, instead of ``key_file``.
        cert: ``(certificate file, key file)`` for mTLS.
        timeout: seconds for connect and read.
        transport: an ``httpx`` transport (e.g. ``httpx.ASGITransport`` or a mock in tests);
            it decides what goes on the wire, so ``http://`` is then not checked.
        verify: TLS verification (a CA bundle path, ``str`` or ``os.PathLike``, or ``False``
            only for tests).
        grant: the grant token the cryptographic operations present unless given their own
            ``grant=`` (``KEYGRANTS_GRANT``); ``""``: none, and the environment is not read.
        dpop_key: the proof-of-possession key of DPoP-bound grants (``KEYGRANTS_DPOP_KEY_FILE``,
            a PEM Ed25519 or P-256 private key); see :func:`load_dpop_key`.
        allow_insecure_http: allow ``http://`` to a host that is not loopback (also
            ``KEYGRANTS_ALLOW_INSECURE_HTTP=1``): credentials, plaintexts and data keys then
            cross the network in clear.

    Credentials come from the arguments when any of ``token``, ``principal``, ``key_file``
    and ``signing_key`` is given (``token=""``: none), else from ``KEYGRANTS_TOKEN`` or
    ``KEYGRANTS_PRINCIPAL`` + ``KEYGRANTS_KEY_FILE``; a token and a signing key together are
    refused. A key file that group or others may access is used with a ``UserWarning``.
    ``KEYGRANTS_GRANT`` and ``KEYGRANTS_DPOP_KEY_FILE`` are read only when neither ``grant`` nor
    ``dpop_key`` is given. ``create_grant`` never uses the default grant: a sub-grant needs its
    parent's token passed to it (``grant=``).

    Raises:
        InvalidRequest: ``key_file`` (``KEYGRANTS_KEY_FILE``) or ``KEYGRANTS_DPOP_KEY_FILE``
            cannot be read.
        ValueError: an address without a scheme, with another scheme than ``https``/``http``,
            malformed, or ``http://`` to a host that is not loopback without the opt-in; a
            token together with a signing key; a principal without its key (or the other way
            round); a key file without a usable key; or a token with spaces, control or
            non-ASCII characters.
    """

    def __init__(self, addr: str | None = None, *, token: str | None = None,
                 principal: str | None = None,
                 key_file: str | os.PathLike[str] | None = None,
                 signing_key: SigningKey | None = None,
                 cert: tuple[str, str] | None = None,
                 timeout: float = 10.0, transport: httpx.BaseTransport | None = None,
                 verify: bool | str | os.PathLike[str] = True, grant: str | None = None,
                 dpop_key: SigningKey | None = None, allow_insecure_http: bool = False) -> None:
        self.addr = _base_url(addr, own_transport=off_network(transport),
                              allow_insecure_http=allow_insecure_http)
        self._shown_addr = redact_address(self.addr)
        token, auth = _credentials(token, principal, key_file, signing_key)
        self._grants = _GrantPresenter(grant, dpop_key)
        self._http = httpx.Client(base_url=self.addr, headers=_headers(token), auth=auth,
                                  timeout=timeout, transport=transport,
                                  verify=tls_verify(verify, cert))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close connections."""
        self._http.close()

    def _call(self, op: _Op[T]) -> T:
        headers, proven = self._grants.prepare(op)
        content = _content(op)
        try:
            response = self._send(op, content, headers, proven)
            if proven is not None and self._grants.wants_nonce(response):
                response = self._send(op, content, headers, proven)  # once, with the nonce
        except httpx.TransportError as exc:
            raise _transport_failure(self._shown_addr, op.method, exc) from exc
        return _result(op, response)

    def _send(self, op: _Op[Any], content: bytes | None, headers: dict[str, str],
              proven: str | None) -> httpx.Response:
        request = self._http.build_request(op.method, op.path, content=content,
                                           params=op.params, headers=headers)
        if proven is not None:
            self._grants.prove(request, proven)
        return self._http.send(request)

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

    def describe_key(self, key: str, *, grant: str | None = None) -> m.KeyInfo:
        """A key's metadata, by id, name or alias (``grant=``: see the crypto operations)."""
        return self._call(_Ops.describe_key(key, grant))

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
    # Each takes ``grant=``: a grant token to present (default: the client's; ``""``: none).
    # Binary arguments must be bytes-like: a str raises TypeError (see the module docstring).
    def encrypt(self, key: str, plaintext: bytes, *, context: Mapping[str, str] | None = None,
                grant: str | None = None) -> m.EncryptResult:
        """Encrypt under the key's latest version."""
        return self._call(_Ops.encrypt(key, plaintext, context, grant))

    def decrypt(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None,
                grant: str | None = None) -> m.DecryptResult:
        """Decrypt a native ciphertext."""
        return self._call(_Ops.decrypt(ciphertext, context, grant))

    def re_encrypt(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None,
                   destination_key: str | None = None,
                   destination_context: Mapping[str, str] | None = None,
                   grant: str | None = None) -> m.ReEncryptResult:
        """Re-encrypt to the latest version or another key, inside the server."""
        return self._call(_Ops.re_encrypt(
            ciphertext, context=context, destination_key=destination_key,
            destination_context=destination_context, grant=grant))

    def generate_data_key(self, key: str, *, size: int = 32,
                          context: Mapping[str, str] | None = None,
                          include_plaintext: bool = True, grant: str | None = None) -> m.DataKey:
        """A fresh data key of 16, 32 or 64 bytes."""
        return self._call(_Ops.generate_data_key(
            key, size=size, context=context, include_plaintext=include_plaintext, grant=grant))

    def batch_encrypt(self, key: str, items: Sequence[tuple[bytes, Mapping[str, str] | None]], *,
                      grant: str | None = None) -> m.BatchResult:
        """Encrypt up to 1,000 ``(plaintext, context)`` items."""
        return self._call(_Ops.batch_encrypt(key, items, grant))

    def batch_decrypt(self, items: Sequence[tuple[bytes, Mapping[str, str] | None]], *,
                      grant: str | None = None) -> m.BatchResult:
        """Decrypt up to 1,000 ``(ciphertext, context)`` items."""
        return self._call(_Ops.batch_decrypt(items, grant))

    def sign(self, key: str, message: bytes, *, message_type: m.MessageType = "raw",
             grant: str | None = None) -> m.SignResult:
        """Sign a message (or a SHA-256 digest with ``message_type="digest"``)."""
        return self._call(_Ops.sign(key, message, message_type, grant))

    def verify(self, key: str, message: bytes, signature: bytes, *,
               message_type: m.MessageType = "raw", key_version: int | None = None,
               grant: str | None = None) -> m.VerifyResult:
        """Check a signature."""
        return self._call(_Ops.verify(key, message, signature, message_type, key_version, grant))

    def get_public_key(self, key: str, *, version: int | None = None,
                       grant: str | None = None) -> m.PublicKey:
        """A signing key's public key (PEM and JWK)."""
        return self._call(_Ops.get_public_key(key, version, grant))

    def mac(self, key: str, message: bytes, *, grant: str | None = None) -> m.MacResult:
        """HMAC-SHA256 tag."""
        return self._call(_Ops.mac(key, message, grant))

    def verify_mac(self, key: str, message: bytes, mac: bytes, *, key_version: int | None = None,
                   grant: str | None = None) -> m.VerifyResult:
        """Check an HMAC tag."""
        return self._call(_Ops.verify_mac(key, message, mac, key_version, grant))

    def derive(self, key: str, context: Mapping[str, str], *, length: int = 32,
               salt: bytes | None = None, key_version: int | None = None,
               grant: str | None = None) -> m.DerivedKey:
        """HKDF-SHA256 from a derivable key."""
        return self._call(_Ops.derive(
            key, context, length=length, salt=salt, key_version=key_version, grant=grant))

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
                if response.status_code >= 300:  # an error, or a redirect (not followed)
                    response.read()
                    _result(_Op("GET", "", None, None), response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    written += len(chunk)
        except httpx.TransportError as exc:
            raise _transport_failure(self._shown_addr, "GET", exc) from exc
        return written
    # -- grants ----------------------------------------------------------------------------
    def create_grant(self, key: str, grantee: str, operations: Sequence[str], *,
                     context_equals: Mapping[str, str] | None = None,
                     context_subset: Mapping[str, str] | None = None, ttl: int | None = None,
                     not_before: datetime | None = None, max_uses: int | None = None,
                     audiences: Sequence[str] = (), dpop_jkt: str | None = None,
                     x5t_s256: str | None = None, name: str | None = None,
                     retiring_principal: str | None = None, justification: str | None = None,
                     grant: str | None = None) -> m.GrantCreated:
        """Grant ``grantee`` the ``operations`` on ``key`` (``ttl`` in seconds; server default
        5 minutes). ``result.token`` is the grant token, or ``None`` while the grant waits for
        approval (HTTP 202). With ``grant=`` (a token carrying ``create_grant``): a sub-grant
        of that grant, which must narrow it. ``dpop_jkt`` (see
        :func:`keygrants.grants.dpop.proof_key_thumbprint`) or ``x5t_s256`` binds the grant to
        a proof-of-possession key or a client certificate."""
        return self._call(_Ops.create_grant(
            key, grantee, operations, context_equals=context_equals, context_subset=context_subset,
            ttl=ttl, not_before=not_before, max_uses=max_uses, audiences=audiences,
            dpop_jkt=dpop_jkt, x5t_s256=x5t_s256, name=name,
            retiring_principal=retiring_principal, justification=justification, grant=grant))

    def list_grants(self, *, key: str | None = None, grantee: str | None = None,
                    retiring_principal: str | None = None, state: str | None = None,
                    limit: int = 100, after: str | None = None) -> m.GrantList:
        """One page of grants matching every given filter (``state``: active, pending,
        exhausted, expired, retired, revoked or rejected)."""
        return self._call(_Ops.list_grants(key=key, grantee=grantee,
                                           retiring_principal=retiring_principal, state=state,
                                           limit=limit, after=after))

    def describe_grant(self, grant_id: str) -> m.GrantInfo:
        """A grant (never its token)."""
        return self._call(_Ops.describe_grant(grant_id))

    def grant_token(self, grant_id: str) -> m.GrantCreated:
        """A fresh token for an active grant (its grantee or creator; e.g. after approval)."""
        return self._call(_Ops.grant_token(grant_id))

    def retire_grant(self, grant_id: str) -> m.GrantInfo:
        """End a grant (its grantee or retiring principal); its sub-grants are revoked."""
        return self._call(_Ops.grant_action(grant_id, "retire"))

    def revoke_grant(self, grant_id: str) -> m.GrantInfo:
        """Revoke a grant and its sub-grants."""
        return self._call(_Ops.grant_action(grant_id, "revoke"))

    def revoke_all_grants(self, *, principal: str | None = None,
                          key: str | None = None) -> m.RevokeAllResult:
        """Revoke every grant of one principal (as grantee) or of one key: give exactly one."""
        return self._call(_Ops.revoke_all_grants(principal=principal, key=key))

    def approve_grant(self, grant_id: str, note: str | None = None) -> m.GrantInfo:
        """Approve a pending (break-glass) grant; never by its requester or grantee."""
        return self._call(_Ops.grant_action(grant_id, "approve", note))

    def reject_grant(self, grant_id: str, note: str | None = None) -> m.GrantInfo:
        """Reject a pending grant."""
        return self._call(_Ops.grant_action(grant_id, "reject", note))

    def exchange_grant(self, subject_token: str, *, scope: str | Sequence[str] | None = None,
                       audience: Sequence[str] | None = None,
                       context_equals: Mapping[str, str] | None = None,
                       context_subset: Mapping[str, str] | None = None, ttl: int | None = None,
                       max_uses: int | None = None,
                       dpop_jkt: str | None = None) -> m.TokenExchangeResult:
        """Trade a grant token of the caller for a narrower one (RFC 8693 token exchange).
        ``scope``: the operations (a list, or space-separated; default: the same but
        ``create_grant``). A DPoP-bound subject token is proven with the client's ``dpop_key``."""
        return self._call(_Ops.exchange_grant(
            subject_token, scope=scope, audience=audience, context_equals=context_equals,
            context_subset=context_subset, ttl=ttl, max_uses=max_uses, dpop_jkt=dpop_jkt))

    def rotate_issuer_key(self) -> m.IssuerKeyInfo:
        """Start a staged rotation of the grant-token issuer key."""
        return self._call(_Ops.rotate_issuer_key())

    def revocations(self, since: int = 0, limit: int = 1000) -> m.RevocationFeed:
        """Revocation feed entries after sequence number ``since`` (public)."""
        return self._call(_Ops.revocations(since, limit))

    def jwks(self) -> dict[str, Any]:
        """The issuer's JWKS: every key that may verify a live grant token (public)."""
        return self._call(_Ops.jwks())

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
        target: str | None = None,
        time: int | None = None,
    ) -> m.PolicyTestResult:
        """Would ``principal`` be allowed ``action`` on ``key`` (or, for the principal-scoped
        actions, on principal ``target``), at Unix time ``time`` (default: now)? The result says
        which statements decided."""
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
                    target=target,
                    time=time,
                ),
                m.PolicyTestResult,
            )
        )


class AsyncClient:
    """Asynchronous client with the same operations and arguments as :class:`Client`."""

    def __init__(self, addr: str | None = None, *, token: str | None = None,
                 principal: str | None = None,
                 key_file: str | os.PathLike[str] | None = None,
                 signing_key: SigningKey | None = None,
                 cert: tuple[str, str] | None = None,
                 timeout: float = 10.0, transport: httpx.AsyncBaseTransport | None = None,
                 verify: bool | str | os.PathLike[str] = True, grant: str | None = None,
                 dpop_key: SigningKey | None = None, allow_insecure_http: bool = False) -> None:
        self.addr = _base_url(addr, own_transport=off_network(transport),
                              allow_insecure_http=allow_insecure_http)
        self._shown_addr = redact_address(self.addr)
        token, auth = _credentials(token, principal, key_file, signing_key)
        self._grants = _GrantPresenter(grant, dpop_key)
        self._http = httpx.AsyncClient(base_url=self.addr, headers=_headers(token), auth=auth,
                                       timeout=timeout, transport=transport,
                                       verify=tls_verify(verify, cert))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close connections."""
        await self._http.aclose()

    async def _call(self, op: _Op[T]) -> T:
        headers, proven = self._grants.prepare(op)
        content = _content(op)
        try:
            response = await self._send(op, content, headers, proven)
            if proven is not None and self._grants.wants_nonce(response):
                response = await self._send(op, content, headers, proven)  # once, with the nonce
        except httpx.TransportError as exc:
            raise _transport_failure(self._shown_addr, op.method, exc) from exc
        return _result(op, response)

    async def _send(self, op: _Op[Any], content: bytes | None, headers: dict[str, str],
                    proven: str | None) -> httpx.Response:
        request = self._http.build_request(op.method, op.path, content=content,
                                           params=op.params, headers=headers)
        if proven is not None:
            self._grants.prove(request, proven)
        return await self._http.send(request)

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

    async def describe_key(self, key: str, *, grant: str | None = None) -> m.KeyInfo:
        """A key's metadata, by id, name or alias (``grant=``: see the crypto operations)."""
        return await self._call(_Ops.describe_key(key, grant))

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
    # Each takes ``grant=``: a grant token to present (default: the client's; ``""``: none).
    # Binary arguments must be bytes-like: a str raises TypeError (see the module docstring).
    async def encrypt(self, key: str, plaintext: bytes, *, context: Mapping[str, str] | None = None,
                grant: str | None = None) -> m.EncryptResult:
        """Encrypt under the key's latest version."""
        return await self._call(_Ops.encrypt(key, plaintext, context, grant))

    async def decrypt(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None,
                grant: str | None = None) -> m.DecryptResult:
        """Decrypt a native ciphertext."""
        return await self._call(_Ops.decrypt(ciphertext, context, grant))

    async def re_encrypt(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None,
                   destination_key: str | None = None,
                   destination_context: Mapping[str, str] | None = None,
                   grant: str | None = None) -> m.ReEncryptResult:
        """Re-encrypt to the latest version or another key, inside the server."""
        return await self._call(_Ops.re_encrypt(
            ciphertext, context=context, destination_key=destination_key,
            destination_context=destination_context, grant=grant))

    async def generate_data_key(self, key: str, *, size: int = 32,
                          context: Mapping[str, str] | None = None,
                          include_plaintext: bool = True, grant: str | None = None) -> m.DataKey:
        """A fresh data key of 16, 32 or 64 bytes."""
        return await self._call(_Ops.generate_data_key(
            key, size=size, context=context, include_plaintext=include_plaintext, grant=grant))

    async def batch_encrypt(self, key: str, items: Sequence[tuple[bytes, Mapping[str, str] | None]], *,
                      grant: str | None = None) -> m.BatchResult:
        """Encrypt up to 1,000 ``(plaintext, context)`` items."""
        return await self._call(_Ops.batch_encrypt(key, items, grant))

    async def batch_decrypt(self, items: Sequence[tuple[bytes, Mapping[str, str] | None]], *,
                      grant: str | None = None) -> m.BatchResult:
        """Decrypt up to 1,000 ``(ciphertext, context)`` items."""
        return await self._call(_Ops.batch_decrypt(items, grant))

    async def sign(self, key: str, message: bytes, *, message_type: m.MessageType = "raw",
             grant: str | None = None) -> m.SignResult:
        """Sign a message (or a SHA-256 digest with ``message_type="digest"``)."""
        return await self._call(_Ops.sign(key, message, message_type, grant))

    async def verify(self, key: str, message: bytes, signature: bytes, *,
               message_type: m.MessageType = "raw", key_version: int | None = None,
               grant: str | None = None) -> m.VerifyResult:
        """Check a signature."""
        return await self._call(_Ops.verify(key, message, signature, message_type, key_version, grant))

    async def get_public_key(self, key: str, *, version: int | None = None,
                       grant: str | None = None) -> m.PublicKey:
        """A signing key's public key (PEM and JWK)."""
        return await self._call(_Ops.get_public_key(key, version, grant))

    async def mac(self, key: str, message: bytes, *, grant: str | None = None) -> m.MacResult:
        """HMAC-SHA256 tag."""
        return await self._call(_Ops.mac(key, message, grant))

    async def verify_mac(self, key: str, message: bytes, mac: bytes, *, key_version: int | None = None,
                   grant: str | None = None) -> m.VerifyResult:
        """Check an HMAC tag."""
        return await self._call(_Ops.verify_mac(key, message, mac, key_version, grant))

    async def derive(self, key: str, context: Mapping[str, str], *, length: int = 32,
               salt: bytes | None = None, key_version: int | None = None,
               grant: str | None = None) -> m.DerivedKey:
        """HKDF-SHA256 from a derivable key."""
        return await self._call(_Ops.derive(
            key, context, length=length, salt=salt, key_version=key_version, grant=grant))

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
                if response.status_code >= 300:  # an error, or a redirect (not followed)
                    await response.aread()
                    _result(_Op("GET", "", None, None), response)
                async for chunk in response.aiter_bytes():
                    out.write(chunk)
                    written += len(chunk)
        except httpx.TransportError as exc:
            raise _transport_failure(self._shown_addr, "GET", exc) from exc
        return written

    async def audit_hash(self, value: str) -> m.AuditDigest:
        """The keyed digest the log records in place of ``value``."""
        return await self._call(_Ops.audit_hash(value))

    async def audit_key(self) -> m.AuditKey:
        """The audit log's origin and verifier key."""
        return await self._call(_Ops.audit_key())
    # -- grants ----------------------------------------------------------------------------
    async def create_grant(self, key: str, grantee: str, operations: Sequence[str], *,
                     context_equals: Mapping[str, str] | None = None,
                     context_subset: Mapping[str, str] | None = None, ttl: int | None = None,
                     not_before: datetime | None = None, max_uses: int | None = None,
                     audiences: Sequence[str] = (), dpop_jkt: str | None = None,
                     x5t_s256: str | None = None, name: str | None = None,
                     retiring_principal: str | None = None, justification: str | None = None,
                     grant: str | None = None) -> m.GrantCreated:
        """Grant ``grantee`` the ``operations`` on ``key`` (``ttl`` in seconds; server default
        5 minutes). ``result.token`` is the grant token, or ``None`` while the grant waits for
        approval (HTTP 202). With ``grant=`` (a token carrying ``create_grant``): a sub-grant
        of that grant, which must narrow it. ``dpop_jkt`` (see
        :func:`keygrants.grants.dpop.proof_key_thumbprint`) or ``x5t_s256`` binds the grant to
        a proof-of-possession key or a client certificate."""
        return await self._call(_Ops.create_grant(
            key, grantee, operations, context_equals=context_equals, context_subset=context_subset,
            ttl=ttl, not_before=not_before, max_uses=max_uses, audiences=audiences,
            dpop_jkt=dpop_jkt, x5t_s256=x5t_s256, name=name,
            retiring_principal=retiring_principal, justification=justification, grant=grant))

    async def list_grants(self, *, key: str | None = None, grantee: str | None = None,
                    retiring_principal: str | None = None, state: str | None = None,
                    limit: int = 100, after: str | None = None) -> m.GrantList:
        """One page of grants matching every given filter (``state``: active, pending,
        exhausted, expired, retired, revoked or rejected)."""
        return await self._call(_Ops.list_grants(key=key, grantee=grantee,
                                           retiring_principal=retiring_principal, state=state,
                                           limit=limit, after=after))

    async def describe_grant(self, grant_id: str) -> m.GrantInfo:
        """A grant (never its token)."""
        return await self._call(_Ops.describe_grant(grant_id))

    async def grant_token(self, grant_id: str) -> m.GrantCreated:
        """A fresh token for an active grant (its grantee or creator; e.g. after approval)."""
        return await self._call(_Ops.grant_token(grant_id))

    async def retire_grant(self, grant_id: str) -> m.GrantInfo:
        """End a grant (its grantee or retiring principal); its sub-grants are revoked."""
        return await self._call(_Ops.grant_action(grant_id, "retire"))

    async def revoke_grant(self, grant_id: str) -> m.GrantInfo:
        """Revoke a grant and its sub-grants."""
        return await self._call(_Ops.grant_action(grant_id, "revoke"))

    async def revoke_all_grants(self, *, principal: str | None = None,
                          key: str | None = None) -> m.RevokeAllResult:
        """Revoke every grant of one principal (as grantee) or of one key: give exactly one."""
        return await self._call(_Ops.revoke_all_grants(principal=principal, key=key))

    async def approve_grant(self, grant_id: str, note: str | None = None) -> m.GrantInfo:
        """Approve a pending (break-glass) grant; never by its requester or grantee."""
        return await self._call(_Ops.grant_action(grant_id, "approve", note))

    async def reject_grant(self, grant_id: str, note: str | None = None) -> m.GrantInfo:
        """Reject a pending grant."""
        return await self._call(_Ops.grant_action(grant_id, "reject", note))

    async def exchange_grant(self, subject_token: str, *, scope: str | Sequence[str] | None = None,
                       audience: Sequence[str] | None = None,
                       context_equals: Mapping[str, str] | None = None,
                       context_subset: Mapping[str, str] | None = None, ttl: int | None = None,
                       max_uses: int | None = None,
                       dpop_jkt: str | None = None) -> m.TokenExchangeResult:
        """Trade a grant token of the caller for a narrower one (RFC 8693 token exchange).
        ``scope``: the operations (a list, or space-separated; default: the same but
        ``create_grant``). A DPoP-bound subject token is proven with the client's ``dpop_key``."""
        return await self._call(_Ops.exchange_grant(
            subject_token, scope=scope, audience=audience, context_equals=context_equals,
            context_subset=context_subset, ttl=ttl, max_uses=max_uses, dpop_jkt=dpop_jkt))

    async def rotate_issuer_key(self) -> m.IssuerKeyInfo:
        """Start a staged rotation of the grant-token issuer key."""
        return await self._call(_Ops.rotate_issuer_key())

    async def revocations(self, since: int = 0, limit: int = 1000) -> m.RevocationFeed:
        """Revocation feed entries after sequence number ``since`` (public)."""
        return await self._call(_Ops.revocations(since, limit))

    async def jwks(self) -> dict[str, Any]:
        """The issuer's JWKS: every key that may verify a live grant token (public)."""
        return await self._call(_Ops.jwks())

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
        target: str | None = None,
        time: int | None = None,
    ) -> m.PolicyTestResult:
        """Would ``principal`` be allowed ``action`` on ``key`` (or, for the principal-scoped
        actions, on principal ``target``), at Unix time ``time`` (default: now)? The result says
        which statements decided."""
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
                    target=target,
                    time=time,
                ),
                m.PolicyTestResult,
            )
        )
