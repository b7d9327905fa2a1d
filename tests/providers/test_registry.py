"""Provider registration by scheme: lazy imports, and a missing extra named with its pip
command."""

from __future__ import annotations

import sys

import pytest

from keygrants.errors import ProviderConnectionError
from keygrants.providers import open_provider, open_root_provider, registered_schemes


def test_every_scheme_is_registered() -> None:
    assert {"aws-kms", "vault", "pkcs11", "gcp-kms", "keygrants", "local"} <= set(
        registered_schemes())


@pytest.mark.parametrize(("uri", "driver", "module", "extra"), [
    ("aws-kms://k?region=us-east-1", "boto3", "keygrants.providers.aws", "aws"),
    ("vault://h:8200/k", "hvac", "keygrants.providers.vault", "vault"),
    ("pkcs11:token=t?module-path=/x.so", "pkcs11", "keygrants.providers.pkcs11", "pkcs11"),
    ("gcp-kms://projects/p/locations/l/keyRings/r/cryptoKeys/k", "google.cloud",
     "keygrants.providers.gcp", "gcp"),
])
def test_a_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, uri: str,
                                               driver: str, module: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, driver, None)  # makes `import driver` fail
    monkeypatch.delitem(sys.modules, module, raising=False)  # re-import the provider module
    with pytest.raises(ProviderConnectionError, match=rf"pip install 'keygrants\[{extra}\]'"):
        open_provider(uri)
    with pytest.raises(ProviderConnectionError, match="pip install"):
        open_root_provider(uri)  # the same path for `keygrants server --seal URI`


def test_provider_modules_are_imported_only_when_opened() -> None:
    import subprocess

    code = ("import sys, keygrants.providers as p; p.registered_schemes(); "
            "print(sorted(m for m in ('boto3', 'hvac', 'pkcs11', 'grpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_the_seal_gives_up_on_a_hanging_provider_call_without_waiting_for_it() -> None:
    """A provider call abandoned at its timeout (a server answering a byte at a time) kept the
    seal's asyncio.run waiting for its worker thread when the loop ended: on Python 3.11
    without a bound, so the server's start (or a reseal) hung for good."""
    import threading

    from keygrants.errors import ProviderConnectionError
    from keygrants.providers._options import run_blocking
    from keygrants.providers.base import KeyProvider, ProviderSeal
    from keygrants.providers.models import EncryptedData

    release = threading.Event()

    class Hanging(KeyProvider):
        name, uri = "hanging", "hanging:"

        async def encrypt(self, plaintext: bytes, *, key_id: str | None = None,
                          context: object = None) -> EncryptedData:
            await run_blocking(release.wait, 30, timeout=0.2, what="hanging: encrypt")
            raise AssertionError("not reached")

        async def decrypt(self, encrypted: EncryptedData, *, context: object = None) -> bytes:
            raise AssertionError("not called")

    try:
        with pytest.raises(ProviderConnectionError, match="no answer within"):
            ProviderSeal(Hanging()).wrap(b"k" * 32, aad=b"aad")
        # answered while the abandoned call still hangs: nothing waited for it
        assert any(t.name == "keygrants-seal-call" and t.is_alive() and t.daemon
                   for t in threading.enumerate()), "the seal waited for the abandoned call"
    finally:
        release.set()
