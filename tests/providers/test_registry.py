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
