"""``pkcs11:`` specifics against SoftHSM2: RFC 7512 URIs, PIN sources, a key that never
leaves the token, and the ciphertext layout (pinned by decrypting on the token directly)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pkcs11
import pytest
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, ObjectClass

from keygrants.errors import KMSError, ProviderConnectionError
from keygrants.keys.context import canonical_context
from keygrants.providers import open_provider
from keygrants.providers.pkcs11 import Pkcs11Provider, generate_aes_key

if TYPE_CHECKING:
    from conftest import SoftHsm

pytestmark = pytest.mark.anyio

PIN = "kg-user-pin-4417"
MOD = "/usr/lib/softhsm/libsofthsm2.so"


@pytest.fixture(autouse=True)
def _no_pin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYGRANTS_PKCS11_PIN", raising=False)


def raw_session(hsm: SoftHsm, *, rw: bool = False) -> Any:
    """A session straight through python-pkcs11 (the process may already be logged in)."""
    token = pkcs11.lib(hsm.module).get_token(token_label="kg")
    try:
        return token.open(rw=rw, user_pin=PIN)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        return token.open(rw=rw)


# -- URIs ---------------------------------------------------------------------------------------

def test_rfc7512_uri_and_pin_never_in_the_recorded_uri() -> None:
    p = Pkcs11Provider.from_uri(f"pkcs11:token=My%20Token;object=root%3Bkek;type=secret-key"
                                f"?module-path={MOD}&pin-value=1234")
    assert p._match["token"] == "My Token" and p.default_key_id == "root;kek"
    assert p._pin == "1234"
    assert p.uri == f"pkcs11:token=My%20Token;object=root%3Bkek?module-path={MOD}"
    assert "1234" not in repr(p)
    alt = Pkcs11Provider.from_uri(f"pkcs11:module={MOD};serial=abc;slot-id=7;object=k")
    assert alt._module == MOD and alt._slot_id == 7 and alt._match["serial"] == "abc"


def test_pin_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = f"pkcs11:token=t;object=k?module-path={MOD}"
    pin_file = tmp_path / "pin"
    pin_file.write_text("from-file\n")
    assert Pkcs11Provider.from_uri(f"{base}&pin-source=file:{pin_file}")._pin == "from-file"
    assert Pkcs11Provider.from_uri(f"{base}&pin-source={pin_file}")._pin == "from-file"
    monkeypatch.setenv("MY_HSM_PIN", "from-named-env")
    p = Pkcs11Provider.from_uri(f"{base}&x-pin-env=MY_HSM_PIN")
    assert p._pin == "from-named-env" and "x-pin-env=MY_HSM_PIN" in p.uri
    assert Pkcs11Provider.from_uri(base, pin_env="MY_HSM_PIN")._pin == "from-named-env"
    monkeypatch.setenv("KEYGRANTS_PKCS11_PIN", "from-default-env")
    assert Pkcs11Provider.from_uri(base)._pin == "from-default-env"
    assert Pkcs11Provider.from_uri(f"{base}&pin-value=v", pin="kw")._pin == "kw"


@pytest.mark.parametrize(("uri", "message"), [
    ("pkcs11:token=t;object=k", "module-path"),
    (f"pkcs11:object=k?module-path={MOD}", "name the token"),
    (f"pkcs11:token=t;object=k;type=private-key?module-path={MOD}", "secret-key"),
    (f"pkcs11:token=t;colour=blue?module-path={MOD}", "unsupported path attribute"),
    (f"pkcs11:token=t?module-path={MOD}&pin=1", "unsupported query attribute"),
    (f"pkcs11:token=t;token=u?module-path={MOD}", "given twice"),
    (f"pkcs11:token=t;slot-id=x?module-path={MOD}", "slot-id"),
    (f"pkcs11:token=t?module-path={MOD}&pin-source=/nonexistent/pin", "pin-source"),
    (f"pkcs11:token=t?module-path={MOD}&x-timeout=-1", "timeout"),
])
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_provider(uri)


@pytest.mark.parametrize(("uri", "message"), [
    (f"pkcs11:token=t?module-path={MOD}&pin-value=s3cr&Zq7", "malformed query attribute number 3"),
    (f"pkcs11:token=t?module-path={MOD}&pin-value=s3cr&Zq7=W8x",
     "unsupported query attribute number 3"),
    ("pkcs11:token=t?pin-value=s3cr&module-path=Zq7&module-path=W8x",
     "query attribute number 3 given twice"),
    (f"pkcs11:token=t?module-path={MOD}&pin-value=s3cr&x-timeout=Zq7W8x", "timeout"),
    (f"pkcs11:token=t;pin-value=s3cr;Zq7W8x?module-path={MOD}", "malformed path attribute number 3"),
    (f"pkcs11:token=t;pin-value=s3cr;Zq7=W8x?module-path={MOD}",
     "unsupported path attribute number 2"),
])
def test_errors_never_quote_a_uri_that_carries_a_pin(uri: str, message: str) -> None:
    """A PIN with an unencoded ``&`` (or ``;``) splits into attributes: none is quoted."""
    with pytest.raises(ValueError, match=message) as caught:
        open_provider(uri)
    exc: BaseException | None = caught.value
    while exc is not None:  # nor in a chained exception a logger could print
        for part in ("s3cr", "Zq7", "W8x"):
            assert part not in str(exc)
        exc = exc.__cause__ or exc.__context__


def test_errors_quote_attributes_when_there_is_no_pin() -> None:
    with pytest.raises(ValueError, match="'colour'"):
        open_provider(f"pkcs11:token=t?module-path={MOD}&colour=blue")
    with pytest.raises(ValueError, match="'colour'"):
        open_provider(f"pkcs11:token=t;colour=blue?module-path={MOD}")


# -- the token ----------------------------------------------------------------------------------

def test_generated_keys_never_leave_the_token(softhsm: SoftHsm) -> None:
    with raw_session(softhsm) as session:
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES,
                              label="enc")
        assert key[Attribute.TOKEN] and key[Attribute.SENSITIVE]
        assert not key[Attribute.EXTRACTABLE] and key[Attribute.NEVER_EXTRACTABLE]
        assert not key[Attribute.WRAP] and not key[Attribute.DERIVE]
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC,
                                  label="sig")
        assert private[Attribute.SENSITIVE] and not private[Attribute.EXTRACTABLE]


async def test_the_ciphertext_layout(softhsm: SoftHsm) -> None:
    """0x01 | nonce (12) | AES-GCM ciphertext || tag (16), AAD = the canonical context."""
    p = open_provider(softhsm.uri(), pin=PIN)
    ctx = {"tenant": "42", "a": "b"}
    enc = await p.encrypt(b"secret", context=ctx)
    ct = enc.ciphertext
    assert ct[0] == 0x01 and len(ct) == 1 + 12 + len(b"secret") + 16
    assert enc.algorithm == "pkcs11:AES-256-GCM"
    with raw_session(softhsm) as session:
        key = session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES,
                              label="enc")
        out = key.decrypt(ct[13:], mechanism=Mechanism.AES_GCM,
                          mechanism_param=GCMParams(ct[1:13], canonical_context(ctx), 128))
    assert out == b"secret"
    await p.close()


async def test_an_extractable_key_is_refused(softhsm: SoftHsm) -> None:
    with raw_session(softhsm, rw=True) as session:
        session.generate_key(KeyType.AES, 256, label="loose", store=True,
                             template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False})
    p = open_provider(softhsm.uri(obj="loose"), pin=PIN)
    with pytest.raises(KMSError, match="refusing"):
        await p.initialize()
    await p.close()


def test_generating_over_an_existing_label_is_refused(softhsm: SoftHsm) -> None:
    with pytest.raises(ValueError, match="already exists"):
        generate_aes_key(softhsm.uri(obj="enc"), pin=PIN)


async def test_a_wrong_pin(softhsm: SoftHsm) -> None:
    # "kg-pin" is a token no session of this process ever logged in to.
    p = open_provider(softhsm.uri(token="kg-pin"), pin="wrong-pin-1234")
    with pytest.raises(ProviderConnectionError, match="refused the PIN") as info:
        await p.initialize()
    assert "wrong-pin-1234" not in str(info.value)
    await p.close()


async def test_no_pin_for_a_token_that_needs_one(softhsm: SoftHsm) -> None:
    p = open_provider(softhsm.uri(token="kg-pin"))
    with pytest.raises(ProviderConnectionError, match="requires a PIN"):
        await p.initialize()
    await p.close()


async def test_token_selection(softhsm: SoftHsm) -> None:
    serial = pkcs11.lib(softhsm.module).get_token(token_label="kg").serial.decode()
    p = open_provider(f"pkcs11:serial={serial};object=enc?module-path={softhsm.module}", pin=PIN)
    await p.initialize()
    await p.close()
    nothing = open_provider(f"pkcs11:token=kg;model=nope;object=enc?module-path={softhsm.module}",
                            pin=PIN)
    with pytest.raises(ProviderConnectionError, match="no token"):
        await nothing.initialize()
