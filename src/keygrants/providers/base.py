"""Provider ports.

:class:`RootKeyProvider` wraps the server's root key (the seal). :class:`KeyProvider` is the
application-side KMS interface that :class:`~keygrants.KeyManager` and the providers
(``local:``, ``pkcs11:``, ``aws-kms:``, ``vault:``, ``gcp-kms:``, ``keygrants:``) implement:
wrap and unwrap data keys, encrypt and decrypt small secrets bound to a context, and sign
where the backend can. Providers translate their client's errors into the
:class:`~keygrants.errors.KMSError` tree (``ProviderConnectionError``, ``KeyNotFoundError``,
``EncryptionError``, ``DecryptionError``, ``UnsupportedOperation``); they never let a driver
exception escape.

Every :class:`KeyProvider` is also usable as a seal through :class:`ProviderSeal`.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import threading
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from keygrants.errors import DecryptionError, UnsealFailed, UnsupportedOperation
from keygrants.providers.models import DataKeyPair, EncryptedData, KeyReference, RotationPolicy

__all__ = ["KeyProvider", "ProviderSeal", "RootKeyProvider"]


@runtime_checkable
class RootKeyProvider(Protocol):
    """Wraps small secrets (the root key) under a key the provider holds."""

    @property
    def uri(self) -> str:
        """The provider URI without secrets, as recorded next to the wrapped blob."""

    def wrap(self, plaintext: bytes, *, aad: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` bound to ``aad``."""

    def unwrap(self, blob: bytes, *, aad: bytes) -> bytes:
        """Reverse :meth:`wrap`.

        Raises:
            UnsealFailed: if the blob does not open under this provider's key.
        """


class KeyProvider(abc.ABC):
    """An application-side key provider (async; blocking clients run in a worker thread).

    Attributes:
        name: the registered provider name (``"aws-kms"``, ``"vault"``, ...), stored in every
            :class:`KeyReference` it makes.
        uri: the URI it was opened with, without secrets.
        default_key_id: the key named in the URI, if any.
    """

    name: str
    uri: str
    default_key_id: str | None = None
    _resolved_key_id: str | None = None
    """The backend's own id for :attr:`default_key_id` (an ARN for an alias, a keygrants key
    id for a name), once a call has shown it; subclasses whose references record such an id
    set it."""

    async def initialize(self) -> None:  # noqa: B027 (optional hook)
        """Connect and check the key exists; the caller applies the timeout."""

    def reference(self, key_id: str | None) -> KeyReference:
        """A reference to ``key_id`` (or the URI's key) at this provider."""
        key = key_id or self.default_key_id
        if not key:
            raise ValueError(f"{self.name}: no key id given and none in the provider URI")
        return KeyReference(provider=self.name, key_id=key)

    def holds_key(self, ref: KeyReference) -> bool | None:
        """Whether a record naming ``ref`` is one this provider made with the key in its URI.

        :class:`~keygrants.KeyManager` asks every provider of the record's kind, so that two
        providers of one kind (two regions, two key files) each get their own records back.

        Returns:
            ``True`` when ``ref`` names this provider's own key as the provider records it:
            its key id, the backend's id for it once known (an ARN for an alias), or, before
            that is known, the alias the record keeps in ``key_alias``. ``False`` when the
            provider certainly cannot open it (another kind; subclasses add other regions, a
            single-key provider's other keys). ``None`` when it cannot tell: a key of this
            kind that was named per call.
        """
        if ref.provider != self.name:
            return False
        key = self.default_key_id
        if key is None:
            return None
        if ref.key_id == key:
            return True
        resolved = self._resolved_key_id
        if resolved is not None:  # the alias may name another key now: trust the id alone
            return True if ref.key_id == resolved else None
        return True if ref.key_alias == key else None

    @abc.abstractmethod
    async def encrypt(self, plaintext: bytes, *, key_id: str | None = None,
                      context: Mapping[str, str] | None = None) -> EncryptedData:
        """Encrypt a small secret bound to ``context``: at most 4 KiB, beyond which every
        provider raises :class:`~keygrants.errors.PayloadTooLarge`."""

    @abc.abstractmethod
    async def decrypt(self, encrypted: EncryptedData, *,
                      context: Mapping[str, str] | None = None) -> bytes:
        """Decrypt; every failure is :class:`~keygrants.errors.DecryptionError`.

        ``context`` defaults to the context recorded in ``encrypted``.
        """

    async def generate_data_key(self, *, key_id: str | None = None, key_spec: str = "AES_256",
                                context: Mapping[str, str] | None = None) -> DataKeyPair:
        """A fresh data key and its wrapped form; the default draws 32 random bytes locally
        and wraps them with :meth:`encrypt` (providers with a native call override it)."""
        import secrets

        if key_spec != "AES_256":
            raise ValueError("only AES_256 data keys are supported")
        plaintext = secrets.token_bytes(32)
        encrypted = await self.encrypt(plaintext, key_id=key_id, context=context)
        return DataKeyPair(plaintext_key=plaintext, encrypted_key=encrypted,
                           key_reference=encrypted.key_reference)

    async def sign(self, message: bytes, *, key_id: str | None = None) -> bytes:
        """Sign where the backend can."""
        raise UnsupportedOperation(f"{self.name} cannot sign")

    async def get_rotation_policy(self, key_id: str | None = None) -> RotationPolicy:
        """The provider key's rotation policy, where the backend reports one."""
        return RotationPolicy(enabled=False)

    async def release_loop(self) -> None:  # noqa: B027 (optional hook)
        """Release what is bound to the running event loop (its connections), before that
        loop ends; the provider stays usable from other loops."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release clients and connections."""


class _DaemonCalls(concurrent.futures.ThreadPoolExecutor):
    """The seal's executor: each blocking client call in a daemon thread of its own, and
    nothing waited for at shutdown. ``asyncio.run`` waits for the default executor's threads
    when it ends (without a bound on Python 3.11), so a call abandoned at its timeout (a
    server answering a byte at a time) would hang the start, or the exit, for good."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the waiting coroutine
                future.set_exception(exc)
            else:
                future.set_result(result)

        threading.Thread(target=call, name="keygrants-seal-call", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None  # an abandoned call is not waited for


class ProviderSeal:
    """Use any :class:`KeyProvider` as the server's seal (auto-unseal, like Vault's).

    The AAD is passed to the provider as the encryption context ``{"keygrants-seal": hex}``.
    Runs the provider's coroutines on a private event loop: the seal is used at start-up and
    by ``operator reseal``, never on the request path.
    """

    def __init__(self, provider: KeyProvider) -> None:
        self._provider = provider

    @property
    def uri(self) -> str:
        return self._provider.uri

    def _run(self, coro: Any) -> object:
        provider = self._provider

        async def on_a_private_loop() -> object:
            asyncio.get_running_loop().set_default_executor(_DaemonCalls())
            try:
                return await coro
            finally:
                await provider.release_loop()  # the loop ends here; so do its connections
        return asyncio.run(on_a_private_loop())

    def wrap(self, plaintext: bytes, *, aad: bytes) -> bytes:
        import msgspec

        enc = self._run(self._provider.encrypt(plaintext, context={"keygrants-seal": aad.hex()}))
        assert isinstance(enc, EncryptedData)
        return msgspec.json.encode(enc.to_dict())

    def unwrap(self, blob: bytes, *, aad: bytes) -> bytes:
        import msgspec

        try:
            enc = EncryptedData.from_dict(msgspec.json.decode(blob))
            out = self._run(self._provider.decrypt(enc, context={"keygrants-seal": aad.hex()}))
        except (ValueError, msgspec.DecodeError, DecryptionError) as exc:
            raise UnsealFailed(f"{self.uri} does not open the root key") from exc
        assert isinstance(out, bytes)
        return out
