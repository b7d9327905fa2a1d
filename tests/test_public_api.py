"""The public facade: explicit, sorted ``__all__`` lists that name real objects."""

from __future__ import annotations

import importlib

import pytest

MODULES = ["keygrants", "keygrants.errors", "keygrants.models", "keygrants.crypto",
           "keygrants.keys", "keygrants.store", "keygrants.providers", "keygrants.api",
           "keygrants.client", "keygrants.service", "keygrants.bus", "keygrants.grants"]


def isort_style(name: str) -> tuple[int, str]:
    """Constants first, then classes, then functions (ruff RUF022's order)."""
    if name.isupper() or (name.upper() == name and "_" in name):
        return (0, name)
    return (1, name) if name[:1].isupper() else (2, name)


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert list(exported) == sorted(exported, key=isort_style), f"{name}.__all__ is not sorted"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.{attr} is exported but missing"


def test_every_error_has_a_code_and_a_docstring() -> None:
    from keygrants import errors

    codes = set()
    for attr in errors.__all__:
        obj = getattr(errors, attr)
        if isinstance(obj, type) and issubclass(obj, errors.KeygrantsError):
            assert obj.__doc__ and obj.__doc__.strip(), attr
            assert obj.code not in codes, f"duplicate code {obj.code}"
            codes.add(obj.code)
            assert 400 <= obj.status <= 599
            assert obj.code in errors.__doc__, f"{obj.code} missing from the tree docstring"


def test_error_from_code_round_trip() -> None:
    from keygrants import errors

    err = errors.error_from_code("key_disabled", "m", request_id="r")
    assert isinstance(err, errors.KeyDisabled) and err.request_id == "r"
    unknown = errors.error_from_code("brand_new_code", "m", status=409)
    assert isinstance(unknown, errors.Conflict) and unknown.code == "brand_new_code"
    assert err.to_dict() == {"error": {"code": "key_disabled", "message": "m", "request_id": "r"}}


def test_results_never_show_secret_bytes_in_their_repr() -> None:
    from keygrants import models as m

    secret = b"card 4111 1111"
    for obj in (m.DecryptResult(plaintext=secret, key_id="k", key_version=1),
                m.DataKey(ciphertext=b"ct", key_id="k", key_version=1, plaintext=secret),
                m.EncryptRequest(plaintext=secret),
                m.BatchItemResult(plaintext=secret),
                m.DerivedKey(derived=secret, key_id="k", key_version=1),
                m.RandomResult(random=secret)):
        text = repr(obj)
        assert "<redacted>" in text and repr(secret) not in text and "card" not in text
    assert "ciphertext=b'ct'" in repr(m.DataKey(ciphertext=b"ct", key_id="k", key_version=1))


def test_provider_uris_refuse_credentials() -> None:
    import pytest as _pytest

    from keygrants.providers import open_provider

    with _pytest.raises(ValueError, match="credentials do not belong"):
        open_provider("vault://user:s3cret@127.0.0.1:8200/key")
