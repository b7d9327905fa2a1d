"""``pkcs11:`` — an HSM (or SoftHSM2) through python-pkcs11, with keys that never leave it.

URI form, after RFC 7512 (path attributes separated by ``;``, query attributes by ``&``,
values percent-encoded)::

    pkcs11:token=keygrants;object=root-kek?module-path=/usr/lib/softhsm/libsofthsm2.so
    pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=keygrants;object=root-kek?pin-value=1234
    pkcs11:serial=62f8aa78c4cb04dc;object=k1;type=secret-key?module-path=...&pin-source=/run/pin

Path attributes: ``token`` (label), ``serial``, ``manufacturer``, ``model``, ``slot-id`` select
the token (every given attribute must match, and exactly one token must); ``object`` is the
default key's ``CKA_LABEL``; ``type`` may only be ``secret-key``. ``module`` is accepted in
the path as a synonym of ``module-path`` (not RFC 7512, but common). Query attributes:
``module-path`` (the PKCS#11 library), ``pin-value``, ``pin-source`` (a file holding the PIN,
``file:`` prefix optional), and the vendor attributes ``x-pin-env`` (the name of an environment
variable holding the PIN) and ``x-timeout`` (seconds per call, default 10). Keyword options:
``module_path``, ``pin``, ``pin_env``, ``timeout``. The PIN is taken, in order, from ``pin=``,
``pin-value``, ``pin-source``, the ``x-pin-env``/``pin_env`` variable, then
``KEYGRANTS_PKCS11_PIN``. A ``pin-value`` is allowed in the URI because RFC 7512 defines it,
but :attr:`Pkcs11Provider.uri` (what is logged and recorded) never contains it.

Keys: encryption uses an AES key (``CKO_SECRET_KEY``, ``CKK_AES``) found by label; the
provider refuses a key that is extractable or not sensitive, so the key material never leaves
the token. :func:`generate_aes_key` makes such a key (``CKA_TOKEN``, ``CKA_SENSITIVE``,
``CKA_EXTRACTABLE=false``, encrypt/decrypt only). Signing uses an EC private key found by
the same kind of label (:func:`generate_ec_signing_key`): SHA-256 is computed here and the
token signs the digest with ``CKM_ECDSA``; signatures are returned DER-encoded.

Ciphertext layout (AES-256-GCM computed on the token, nonce from the host CSPRNG)::

    0x01 | nonce (12) | ciphertext || tag (16)

The AAD is the canonical encryption context
(:func:`~keygrants.keys.context.canonical_context`).

PKCS#11 keeps the login state per process and token: when another provider in the same
process is already logged in to the token, a new session shares that login. A library loaded
once sees only the tokens that existed then; a token created later needs a new process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote, unquote

import pkcs11
import pkcs11.exceptions as pexc
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from keygrants.crypto.random import nonce_bytes
from keygrants.errors import (
    DecryptionError,
    EncryptionError,
    KeyNotFoundError,
    KMSError,
    ProviderConnectionError,
    UnsupportedOperation,
)
from keygrants.keys.context import canonical_context
from keygrants.providers._options import (
    DEFAULT_TIMEOUT,
    as_timeout,
    check_plaintext,
    decrypt_context,
    run_blocking,
)
from keygrants.providers.base import KeyProvider
from keygrants.providers.models import EncryptedData, KeyReference

__all__ = ["PIN_ENV", "Pkcs11Provider", "generate_aes_key", "generate_ec_signing_key"]

T = TypeVar("T")

SCHEME: Final = "pkcs11"
PIN_ENV: Final = "KEYGRANTS_PKCS11_PIN"
ALGORITHM: Final = "pkcs11:AES-256-GCM"
_V1: Final = 0x01
_NONCE: Final = 12
_TAG: Final = 16
_PATH_ATTRS: Final = frozenset({"token", "serial", "manufacturer", "model", "slot-id",
                                "object", "type", "module"})
_QUERY_ATTRS: Final = frozenset({"module-path", "pin-value", "pin-source", "x-pin-env",
                                 "x-timeout"})
_KWARGS: Final = frozenset({"module_path", "pin", "pin_env", "timeout"})
# Errors after which the session cannot be trusted: drop it and reopen on the next call.
_SESSION_LOST: Final = (pexc.SessionHandleInvalid, pexc.SessionClosed, pexc.DeviceRemoved,
                        pexc.TokenNotPresent, pexc.DeviceError, pexc.UserNotLoggedIn,
                        pexc.KeyHandleInvalid, pexc.ObjectHandleInvalid)


def _split_attrs(text: str, sep: str, where: str, *, secret: bool = False) -> dict[str, str]:
    """Split RFC 7512 attributes.

    With ``secret`` (the text carries a ``pin-value``), errors name an attribute by its
    position, never by its text: an unencoded ``&`` in the PIN would put the rest of the PIN
    into the message, and start-up errors end up in logs.
    """
    out: dict[str, str] = {}
    if not text:
        return out
    for n, item in enumerate(text.split(sep), 1):
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ValueError(_bad(f"malformed {where} attribute", n, item, secret))
        if name in out:
            raise ValueError(_bad(f"{where} attribute", n, name, secret, " given twice"))
        out[name] = unquote(value)
    return out


def _bad(what: str, n: int, text: str, secret: bool, after: str = "") -> str:
    """An attribute error message: quotes ``text`` only when the URI carries no PIN."""
    if not secret:
        return f"pkcs11: {what} {text!r}{after}"
    return (f"pkcs11: {what} number {n}{after} (the URI carries a pin-value: percent-encode "
            "it, or pass pin=)")


def _read_pin_source(source: str) -> str:
    path = source.removeprefix("file:")
    try:
        text = Path(path).read_text()
    except OSError:
        raise ValueError(f"pkcs11: cannot read the PIN from pin-source {path}") from None
    return text.splitlines()[0] if text else ""


class Pkcs11Provider(KeyProvider):
    """Key provider backed by a PKCS#11 token.

    Args:
        module_path: the PKCS#11 library (``.so``).
        token: token label.
        serial: token serial number.
        manufacturer: token manufacturer id.
        model: token model.
        slot_id: slot id.
        key_label: default key's ``CKA_LABEL``.
        pin: user PIN (``None`` for a token that needs no login).
        timeout: seconds per call.

    Raises:
        ValueError: when no token attribute is given or an option is malformed.
    """

    name = SCHEME

    def __init__(self, module_path: str, *, token: str | None = None, serial: str | None = None,
                 manufacturer: str | None = None, model: str | None = None,
                 slot_id: int | None = None, key_label: str | None = None,
                 pin: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 _query: Mapping[str, str] | None = None) -> None:
        if not module_path:
            raise ValueError("pkcs11: module-path (the PKCS#11 library) is required")
        if token is None and serial is None and slot_id is None:
            raise ValueError("pkcs11: name the token with token=LABEL, serial= or slot-id=")
        self._module = module_path
        self._match = {"token": token, "serial": serial, "manufacturer": manufacturer,
                       "model": model}
        self._slot_id = slot_id
        self.default_key_id = key_label or None
        self._pin = pin
        self._timeout = as_timeout(timeout)
        self._lock = threading.Lock()
        self._session: pkcs11.Session | None = None
        self._rw = False
        self._keys: dict[tuple[str, ObjectClass], Any] = {}
        path = [f"{k}={quote(v, safe='')}" for k, v in self._match.items() if v is not None]
        if slot_id is not None:
            path.append(f"slot-id={slot_id}")
        if key_label:
            path.append(f"object={quote(key_label, safe='')}")
        query = [f"module-path={quote(module_path, safe='/')}"]
        query += [f"{k}={quote(v, safe='/:')}" for k, v in sorted((_query or {}).items())
                  if k in ("pin-source", "x-pin-env")]
        self.uri = f"{SCHEME}:{';'.join(path)}?{'&'.join(query)}"

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> Pkcs11Provider:
        """Open a ``pkcs11:`` URI (see the module docstring).

        Raises:
            ValueError: for a malformed URI, an unknown attribute or option, or an unreadable
                pin-source.
        """
        if not uri.startswith(f"{SCHEME}:"):
            raise ValueError("not a pkcs11: URI")
        path_text, _, query_text = uri[len(SCHEME) + 1:].partition("?")
        # Anything after a pin-value may be part of the PIN: never quote the URI then (the
        # path too: a PIN put there by mistake).
        secret = "pin-value" in uri.lower()
        path = _split_attrs(path_text, ";", "path", secret=secret)
        query = _split_attrs(query_text, "&", "query", secret=secret)
        for n, name in enumerate(path, 1):
            if name not in _PATH_ATTRS:
                raise ValueError(_bad("unsupported path attribute", n, name, secret))
        for n, name in enumerate(query, 1):
            if name not in _QUERY_ATTRS:
                raise ValueError(_bad("unsupported query attribute", n, name, secret))
        for name in options:
            if name not in _KWARGS:
                raise ValueError(f"pkcs11: unknown option {name!r}")
        if path.get("type", "secret-key") != "secret-key":
            raise ValueError("pkcs11: type must be secret-key")
        module = options.get("module_path") or query.get("module-path") or path.get("module")
        pin: str | None = options.get("pin")
        if pin is None and "pin-value" in query:
            pin = query["pin-value"]
        if pin is None and "pin-source" in query:
            pin = _read_pin_source(query["pin-source"])
        if pin is None:
            env = options.get("pin_env") or query.get("x-pin-env") or PIN_ENV
            pin = os.environ.get(env)
        slot_id: int | None = None
        if "slot-id" in path:
            try:
                slot_id = int(path["slot-id"])
            except ValueError:
                raise ValueError("pkcs11: slot-id must be a decimal number") from None
        timeout = options.get("timeout") or query.get("x-timeout") or DEFAULT_TIMEOUT
        try:
            seconds: float | None = as_timeout(timeout)
        except ValueError:
            if not secret:
                raise
            seconds = None  # as_timeout quotes the value; raised below, outside this block
        if seconds is None:
            raise ValueError("pkcs11: the timeout (x-timeout) must be a number of seconds")
        return cls(module or "", token=path.get("token"), serial=path.get("serial"),
                   manufacturer=path.get("manufacturer"), model=path.get("model"),
                   slot_id=slot_id, key_label=path.get("object"), pin=pin,
                   timeout=seconds, _query=query)

    def __repr__(self) -> str:
        return f"Pkcs11Provider({self.uri!r})"

    # -- session -------------------------------------------------------------------------
    def _find_token(self, lib: Any) -> Any:
        found = []
        for slot in lib.get_slots(token_present=True):
            if self._slot_id is not None and slot.slot_id != self._slot_id:
                continue
            tok = slot.get_token()
            values = {"token": tok.label, "serial": tok.serial.decode("ascii", "replace"),
                      "manufacturer": tok.manufacturer_id, "model": tok.model}
            if all(want is None or values[k].strip() == want for k, want in self._match.items()):
                found.append(tok)
        if len(found) != 1:
            what = "no token" if not found else f"{len(found)} tokens"
            raise ProviderConnectionError(f"pkcs11: {what} match {self.uri} (a token created "
                                          "after the library was loaded needs a new process)")
        return found[0]

    def _open(self) -> Any:
        """The session, opened (and logged in) on first use; call with the lock held."""
        if self._session is not None:
            return self._session
        try:
            lib = pkcs11.lib(self._module)
        except pexc.PKCS11Error as exc:
            raise ProviderConnectionError(f"pkcs11: cannot load the module {self._module}") from exc
        tok = self._find_token(lib)
        if self._pin is None and tok.flags & TokenFlag.LOGIN_REQUIRED:
            raise ProviderConnectionError(f"pkcs11: token {tok.label!r} requires a PIN (pin=, "
                                          f"pin-source, or {PIN_ENV})")
        try:
            try:
                session = tok.open(rw=self._rw, user_pin=self._pin)
            except pexc.UserAlreadyLoggedIn:  # another session of this process logged in
                session = tok.open(rw=self._rw)
        except (pexc.PinIncorrect, pexc.PinInvalid, pexc.PinLenRange) as exc:
            raise ProviderConnectionError(f"pkcs11: the token {tok.label!r} refused the PIN") from exc
        except pexc.PinLocked as exc:
            raise ProviderConnectionError(f"pkcs11: the PIN of {tok.label!r} is locked") from exc
        except pexc.PKCS11Error as exc:
            raise ProviderConnectionError(f"pkcs11: cannot open a session on {tok.label!r} "
                                          f"({type(exc).__name__})") from exc
        self._session = session
        return session

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        self._keys.clear()
        if session is not None:
            with contextlib.suppress(pexc.PKCS11Error):  # already gone
                session.close()

    def _locked(self, fn: Callable[[Any], T]) -> T:
        with self._lock:
            session = self._open()
            try:
                return fn(session)
            except _SESSION_LOST as exc:
                self._drop_session()
                raise ProviderConnectionError(f"pkcs11: lost the token session "
                                              f"({type(exc).__name__}); it reopens on the next "
                                              "call") from exc

    async def _run(self, fn: Callable[[Any], T], what: str) -> T:
        return await run_blocking(self._locked, fn, timeout=self._timeout, what=f"pkcs11 {what}")

    def _find(self, session: Any, label: str, object_class: ObjectClass) -> Any:
        cached = self._keys.get((label, object_class))
        if cached is not None:
            return cached
        key_type = KeyType.AES if object_class == ObjectClass.SECRET_KEY else KeyType.EC
        try:
            key = session.get_key(object_class=object_class, key_type=key_type, label=label)
        except pexc.NoSuchKey:
            raise KeyNotFoundError(f"pkcs11: no {key_type.name} key labelled {label!r}") from None
        except pexc.MultipleObjectsReturned:
            raise KMSError(f"pkcs11: several {key_type.name} keys are labelled {label!r}") from None
        if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
            raise KMSError(f"pkcs11: refusing key {label!r}: it is extractable or not sensitive")
        self._keys[(label, object_class)] = key
        return key

    # -- KeyProvider ---------------------------------------------------------------------
    async def initialize(self) -> None:
        """Load the module, find the token, log in, and find the URI's key.

        Raises:
            ProviderConnectionError: when the module, token or login fails.
            KeyNotFoundError: when the key does not exist.
            KMSError: when the key is extractable or not sensitive.
        """
        label = self.default_key_id
        if label is None:
            await self._run(lambda s: None, "initialize")
        else:
            await self._run(lambda s: self._find(s, label, ObjectClass.SECRET_KEY), "initialize")

    async def encrypt(self, plaintext: bytes, *, key_id: str | None = None,
                      context: Mapping[str, str] | None = None) -> EncryptedData:
        """AES-GCM on the token, the canonical context as AAD.

        Raises:
            KeyNotFoundError: for an unknown key label.
            ProviderConnectionError: when the token cannot be used.
            EncryptionError: when the token refuses the operation.
        """
        check_plaintext(plaintext)
        aad = canonical_context(context)
        label = self.reference(key_id).key_id
        nonce = nonce_bytes(_NONCE)

        def op(session: Any) -> bytes:
            key = self._find(session, label, ObjectClass.SECRET_KEY)
            try:
                out: bytes = key.encrypt(bytes(plaintext), mechanism=Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(nonce, aad or None, _TAG * 8))
            except _SESSION_LOST:
                raise
            except pexc.PKCS11Error as exc:
                raise EncryptionError(f"pkcs11: the token refused to encrypt "
                                      f"({type(exc).__name__})") from exc
            return out

        sealed = await self._run(op, "encrypt")
        return EncryptedData(ciphertext=bytes([_V1]) + nonce + sealed,
                             key_reference=KeyReference(provider=self.name, key_id=label),
                             algorithm=ALGORITHM, context=dict(context or {}))

    async def decrypt(self, encrypted: EncryptedData, *,
                      context: Mapping[str, str] | None = None) -> bytes:
        """Reverse :meth:`encrypt` on the token.

        Raises:
            DecryptionError: for every cryptographic failure (opaque).
            KeyNotFoundError: when the referenced key does not exist.
            ProviderConnectionError: when the token cannot be used.
        """
        ref = encrypted.key_reference
        blob = encrypted.ciphertext
        if ref.provider != self.name or len(blob) < 1 + _NONCE + _TAG or blob[0] != _V1:
            raise DecryptionError()
        _, aad = decrypt_context(encrypted.context, context)
        nonce, sealed = blob[1:1 + _NONCE], blob[1 + _NONCE:]

        def op(session: Any) -> bytes:
            key = self._find(session, ref.key_id, ObjectClass.SECRET_KEY)
            try:
                out: bytes = key.decrypt(sealed, mechanism=Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(nonce, aad or None, _TAG * 8))
            except _SESSION_LOST:
                raise
            except pexc.PKCS11Error:
                raise DecryptionError() from None
            return out

        return await self._run(op, "decrypt")

    async def sign(self, message: bytes, *, key_id: str | None = None) -> bytes:
        """ECDSA over SHA-256 with an EC private key on the token; DER-encoded signature.

        Raises:
            UnsupportedOperation: when the label names an AES key, not an EC private key.
            KeyNotFoundError: when no key has the label.
            ProviderConnectionError: when the token cannot be used.
        """
        label = self.reference(key_id).key_id
        digest = hashlib.sha256(message).digest()

        def op(session: Any) -> bytes:
            try:
                key = self._find(session, label, ObjectClass.PRIVATE_KEY)
            except KeyNotFoundError:
                try:
                    self._find(session, label, ObjectClass.SECRET_KEY)
                except KeyNotFoundError:
                    raise KeyNotFoundError(f"pkcs11: no key labelled {label!r}") from None
                raise UnsupportedOperation(f"pkcs11: {label!r} is an AES key; signing needs "
                                           "an EC private key") from None
            try:
                raw: bytes = key.sign(digest, mechanism=Mechanism.ECDSA)
            except _SESSION_LOST:
                raise
            except pexc.PKCS11Error as exc:
                raise KMSError(f"pkcs11: the token refused to sign ({type(exc).__name__})") from exc
            half = len(raw) // 2
            return encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                        int.from_bytes(raw[half:], "big"))

        return await self._run(op, "sign")

    async def close(self) -> None:
        """Close the session (the last session of the process logs out)."""
        with self._lock:
            self._drop_session()

    # -- key generation (operators and tests) --------------------------------------------
    def _generate(self, fn: Callable[[Any], T]) -> T:
        self._rw = True
        try:
            return self._locked(fn)
        finally:
            with self._lock:
                self._drop_session()

    def _refuse_existing(self, session: Any, label: str) -> None:
        if any(True for _ in session.get_objects({Attribute.LABEL: label})):
            raise ValueError(f"pkcs11: an object labelled {label!r} already exists on the token")


def generate_aes_key(uri: str, *, label: str | None = None, bits: int = 256,
                     **options: Any) -> str:
    """Generate a non-extractable, sensitive AES key on the token named by ``uri``.

    The key is a token object (``CKA_TOKEN``) usable only to encrypt and decrypt
    (no wrap, unwrap, sign, derive), ``CKA_SENSITIVE`` and not ``CKA_EXTRACTABLE``.

    Args:
        uri: a ``pkcs11:`` URI naming the token (and the label in ``object=``).
        label: the key's label (default: the URI's ``object``).
        bits: 128, 192 or 256.
        **options: as for :meth:`Pkcs11Provider.from_uri`.

    Returns:
        The label.

    Raises:
        ValueError: without a label, for a label already in use, or a bad size.
        ProviderConnectionError: when the token cannot be used.
    """
    if bits not in (128, 192, 256):
        raise ValueError("pkcs11: AES keys are 128, 192 or 256 bits")
    provider = Pkcs11Provider.from_uri(uri, **options)
    key_label = label or provider.default_key_id
    if not key_label:
        raise ValueError("pkcs11: no key label (object= in the URI, or label=)")

    def op(session: Any) -> str:
        provider._refuse_existing(session, key_label)
        session.generate_key(KeyType.AES, bits, label=key_label, store=True, template={
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
            Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.SIGN: False,
            Attribute.VERIFY: False, Attribute.DERIVE: False, Attribute.MODIFIABLE: False,
        })
        return key_label

    return provider._generate(op)


def generate_ec_signing_key(uri: str, *, label: str | None = None, curve: str = "secp256r1",
                            **options: Any) -> bytes:
    """Generate an EC signing key pair on the token; the private key is non-extractable.

    Args:
        uri: a ``pkcs11:`` URI naming the token (and the label in ``object=``).
        label: the key pair's label (default: the URI's ``object``).
        curve: a named curve (``secp256r1``, ``secp384r1``).
        **options: as for :meth:`Pkcs11Provider.from_uri`.

    Returns:
        The public key, DER SubjectPublicKeyInfo.

    Raises:
        ValueError: without a label or for a label already in use.
        ProviderConnectionError: when the token cannot be used.
    """
    provider = Pkcs11Provider.from_uri(uri, **options)
    key_label = label or provider.default_key_id
    if not key_label:
        raise ValueError("pkcs11: no key label (object= in the URI, or label=)")

    def op(session: Any) -> bytes:
        provider._refuse_existing(session, key_label)
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True)
        public, _ = params.generate_keypair(store=True, label=key_label, private_template={
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True,
        })
        der: bytes = encode_ec_public_key(public)
        return der

    return provider._generate(op)
