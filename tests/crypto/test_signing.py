"""SigningKey / VerifyingKey: roundtrips, digest mode, tampering, key loading and JWKs.

Published vectors for the three algorithms run in ``test_wycheproof.py``; this module checks
the wrapper's own API and the JWK shape (interoperability is checked with joserfc).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc import jws
from joserfc.errors import BadSignatureError
from joserfc.jwk import ECKey, OKPKey, RSAKey

from keygrants.crypto import SigningKey, VerifyingKey, b64url

ALGORITHMS = ["ed25519", "ecdsa-p256-sha256", "rsa-pss-3072-sha256"]
DIGEST_ALGORITHMS = ["ecdsa-p256-sha256", "rsa-pss-3072-sha256"]
MESSAGE = b"keygrants signs this"


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    # RSA-3072 generation is slow: one key per algorithm for the whole module.
    return {alg: SigningKey.generate(alg) for alg in ALGORITHMS}  # type: ignore[arg-type]


def _b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _pkcs8(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _spki(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


# -- roundtrips ----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("message", [b"", MESSAGE, bytes(range(256)) * 40])
def test_sign_verify_roundtrip(keys: dict[str, SigningKey], algorithm: str,
                               message: bytes) -> None:
    sk = keys[algorithm]
    assert sk.algorithm == algorithm
    assert sk.public_key().verify(message, sk.sign(message)) is True


@pytest.mark.parametrize("algorithm", DIGEST_ALGORITHMS)
def test_digest_mode_is_interchangeable_with_raw_mode(keys: dict[str, SigningKey],
                                                      algorithm: str) -> None:
    sk, vk = keys[algorithm], keys[algorithm].public_key()
    digest = hashlib.sha256(MESSAGE).digest()
    assert vk.verify(digest, sk.sign(digest, prehashed=True), prehashed=True) is True
    # prehashed=True means "this is SHA-256(message)": both modes make the same statement.
    assert vk.verify(MESSAGE, sk.sign(digest, prehashed=True)) is True
    assert vk.verify(digest, sk.sign(MESSAGE), prehashed=True) is True
    # ...but a digest is not a message: without prehashed it would be hashed again.
    assert vk.verify(digest, sk.sign(MESSAGE)) is False


@pytest.mark.parametrize("algorithm", DIGEST_ALGORITHMS)
@pytest.mark.parametrize("length", [0, 20, 31, 33, 48, 64])
def test_wrong_length_digest_is_refused(keys: dict[str, SigningKey], algorithm: str,
                                        length: int) -> None:
    sk = keys[algorithm]
    signature = sk.sign(hashlib.sha256(MESSAGE).digest(), prehashed=True)
    with pytest.raises(ValueError):
        sk.sign(bytes(length), prehashed=True)
    with pytest.raises(ValueError):
        sk.public_key().verify(bytes(length), signature, prehashed=True)


def test_ed25519_refuses_digest_mode(keys: dict[str, SigningKey]) -> None:
    sk = keys["ed25519"]
    digest = hashlib.sha256(MESSAGE).digest()
    with pytest.raises(ValueError):
        sk.sign(digest, prehashed=True)
    with pytest.raises(ValueError):
        sk.public_key().verify(digest, sk.sign(digest), prehashed=True)


def test_ed25519_is_deterministic_ecdsa_and_pss_are_randomized(
    keys: dict[str, SigningKey],
) -> None:
    assert keys["ed25519"].sign(MESSAGE) == keys["ed25519"].sign(MESSAGE)
    for algorithm in DIGEST_ALGORITHMS:
        assert keys[algorithm].sign(MESSAGE) != keys[algorithm].sign(MESSAGE)


def test_signature_sizes_and_encodings(keys: dict[str, SigningKey]) -> None:
    assert len(keys["ed25519"].sign(MESSAGE)) == 64
    assert len(keys["rsa-pss-3072-sha256"].sign(MESSAGE)) == 384
    der = keys["ecdsa-p256-sha256"].sign(MESSAGE)
    assert der[0] == 0x30  # ASN.1 SEQUENCE, not raw r||s
    r, s = decode_dss_signature(der)
    assert 0 < r < 2**256 and 0 < s < 2**256


# -- negative ------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tampered_signature_is_false(keys: dict[str, SigningKey], algorithm: str) -> None:
    sk = keys[algorithm]
    vk = sk.public_key()
    signature = sk.sign(MESSAGE)
    for position in range(len(signature)):
        tampered = bytearray(signature)
        tampered[position] ^= 0x01
        assert vk.verify(MESSAGE, bytes(tampered)) is False, position
    for bad in (b"", signature[:-1], signature + b"\x00", bytes(len(signature))):
        assert vk.verify(MESSAGE, bad) is False


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tampered_message_is_false(keys: dict[str, SigningKey], algorithm: str) -> None:
    sk = keys[algorithm]
    signature = sk.sign(MESSAGE)
    for position in range(len(MESSAGE)):
        tampered = bytearray(MESSAGE)
        tampered[position] ^= 0x80
        assert sk.public_key().verify(bytes(tampered), signature) is False
    assert sk.public_key().verify(MESSAGE + b"\x00", signature) is False


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_other_key_is_false(keys: dict[str, SigningKey], algorithm: str) -> None:
    other = SigningKey.generate(algorithm)  # type: ignore[arg-type]
    assert other.public_key().verify(MESSAGE, keys[algorithm].sign(MESSAGE)) is False


# -- loading and serialization -------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_private_bytes_roundtrip(keys: dict[str, SigningKey], algorithm: str) -> None:
    sk = keys[algorithm]
    loaded = SigningKey.from_private_bytes(algorithm, sk.private_bytes())  # type: ignore[arg-type]
    assert loaded.public_key().public_der() == sk.public_key().public_der()
    assert sk.public_key().verify(MESSAGE, loaded.sign(MESSAGE)) is True


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_public_key_der_and_pem_roundtrip(keys: dict[str, SigningKey], algorithm: str) -> None:
    sk = keys[algorithm]
    vk = sk.public_key()
    signature = sk.sign(MESSAGE)
    from_der = VerifyingKey.from_der(algorithm, vk.public_der())  # type: ignore[arg-type]
    from_pem = VerifyingKey.from_pem(algorithm, vk.public_pem())  # type: ignore[arg-type]
    from_pem_bytes = VerifyingKey.from_pem(
        algorithm, vk.public_pem().encode()  # type: ignore[arg-type]
    )
    assert vk.public_pem().startswith("-----BEGIN PUBLIC KEY-----")
    for loaded in (from_der, from_pem, from_pem_bytes):
        assert loaded.algorithm == algorithm
        assert loaded.public_der() == vk.public_der()
        assert loaded.verify(MESSAGE, signature) is True


@pytest.fixture(scope="module")
def foreign_private_keys(keys: dict[str, SigningKey]) -> dict[str, bytes]:
    """PKCS#8 keys that are each valid for exactly one (or none) of our algorithms."""
    return {
        "ed25519": keys["ed25519"].private_bytes(),
        "p256": keys["ecdsa-p256-sha256"].private_bytes(),
        "rsa3072": keys["rsa-pss-3072-sha256"].private_bytes(),
        "p384": _pkcs8(ec.generate_private_key(ec.SECP384R1())),
        "rsa2048": _pkcs8(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    }


_FITS = {"ed25519": "ed25519", "p256": "ecdsa-p256-sha256", "rsa3072": "rsa-pss-3072-sha256"}
MISMATCHED = [
    pytest.param(algorithm, material, id=f"{material}-as-{algorithm}")
    for algorithm in ALGORITHMS
    for material in ("ed25519", "p256", "rsa3072", "p384", "rsa2048")
    if _FITS.get(material) != algorithm
]


@pytest.mark.parametrize(("algorithm", "material"), MISMATCHED)
def test_from_private_bytes_rejects_mismatched_algorithm(
    foreign_private_keys: dict[str, bytes], algorithm: str, material: str
) -> None:
    with pytest.raises(ValueError):
        SigningKey.from_private_bytes(algorithm, foreign_private_keys[material])  # type: ignore[arg-type]


@pytest.mark.parametrize(("algorithm", "material"), MISMATCHED)
def test_from_der_and_pem_reject_mismatched_algorithm(
    foreign_private_keys: dict[str, bytes], algorithm: str, material: str
) -> None:
    private = serialization.load_der_private_key(foreign_private_keys[material], password=None)
    der = _spki(private)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ValueError):
        VerifyingKey.from_der(algorithm, der)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        VerifyingKey.from_pem(algorithm, pem)  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_from_private_bytes_rejects_non_signing_keys(algorithm: str) -> None:
    with pytest.raises(ValueError):
        SigningKey.from_private_bytes(
            algorithm, _pkcs8(x25519.X25519PrivateKey.generate())  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError):
        SigningKey.from_private_bytes(algorithm, b"not a key")  # type: ignore[arg-type]


def test_generate_rejects_unknown_algorithm() -> None:
    with pytest.raises(ValueError):
        SigningKey.generate("rsa-pkcs1-2048")  # type: ignore[arg-type]


# -- JWK -----------------------------------------------------------------------------------


def test_ed25519_jwk_shape(keys: dict[str, SigningKey]) -> None:
    vk = keys["ed25519"].public_key()
    jwk = vk.jwk()
    assert set(jwk) == {"kty", "crv", "x", "alg", "use"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert "=" not in jwk["x"]
    # The SPKI of an Ed25519 key is a fixed 12-byte prefix followed by the raw 32-byte key.
    assert _b64url_decode(jwk["x"]) == vk.public_der()[-32:]
    assert len(vk.public_der()) == 44


def test_ecdsa_jwk_shape(keys: dict[str, SigningKey]) -> None:
    vk = keys["ecdsa-p256-sha256"].public_key()
    jwk = vk.jwk()
    assert set(jwk) == {"kty", "crv", "x", "y", "alg", "use"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")
    x, y = _b64url_decode(jwk["x"]), _b64url_decode(jwk["y"])
    assert len(x) == len(y) == 32  # fixed width, leading zeros kept (RFC 7518 6.2.1.2)
    assert vk.public_der()[-65:] == b"\x04" + x + y


def test_ecdsa_jwk_keeps_leading_zero_coordinates() -> None:
    # Find a key whose x coordinate starts with a zero byte (1 in 256 per try).
    for _ in range(5000):
        private = ec.generate_private_key(ec.SECP256R1())
        if private.public_key().public_numbers().x < 2**248:
            break
    else:
        pytest.fail("no key with a short x coordinate found")
    jwk = SigningKey("ecdsa-p256-sha256", private).public_key().jwk()
    assert len(jwk["x"]) == 43
    assert _b64url_decode(jwk["x"])[0] == 0


def test_rsa_jwk_shape(keys: dict[str, SigningKey]) -> None:
    vk = keys["rsa-pss-3072-sha256"].public_key()
    jwk = vk.jwk()
    assert set(jwk) == {"kty", "n", "e", "alg", "use"}
    assert (jwk["kty"], jwk["alg"], jwk["use"], jwk["e"]) == ("RSA", "PS256", "sig", "AQAB")
    n = _b64url_decode(jwk["n"])
    assert len(n) == 384 and n[0] != 0  # minimal big-endian, no sign byte (RFC 7518 6.3.1.1)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_jwk_kid_only_when_given(keys: dict[str, SigningKey], algorithm: str) -> None:
    vk = keys[algorithm].public_key()
    assert "kid" not in vk.jwk()
    assert vk.jwk(kid="key-1#v2")["kid"] == "key-1#v2"


_JOSE = {
    "ed25519": ("EdDSA", OKPKey),
    "ecdsa-p256-sha256": ("ES256", ECKey),
    "rsa-pss-3072-sha256": ("PS256", RSAKey),
}


# joserfc flags "EdDSA" as deprecated by RFC 9864 (in favour of "Ed25519"); the JWK says EdDSA.
@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_jwk_verifies_with_joserfc(keys: dict[str, SigningKey], algorithm: str) -> None:
    sk = keys[algorithm]
    jose_alg, key_class = _JOSE[algorithm]
    jwk = sk.public_key().jwk(kid="k1")
    assert jwk["alg"] == jose_alg
    header = b64url(json.dumps({"alg": jose_alg, "kid": "k1"}).encode())
    payload = b64url(b'{"sub":"alice"}')
    signature = sk.sign(f"{header}.{payload}".encode())
    if algorithm == "ecdsa-p256-sha256":  # JWS wants raw r||s, we produce DER
        r, s = decode_dss_signature(signature)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    token = f"{header}.{payload}.{b64url(signature)}"
    public = key_class.import_key(jwk)
    assert jws.deserialize_compact(token, public, algorithms=[jose_alg]).payload == (
        b'{"sub":"alice"}'
    )
    forged_payload = b64url(b'{"sub":"mallory"}')
    tampered = f"{header}.{forged_payload}.{b64url(signature)}"
    with pytest.raises(BadSignatureError):
        jws.deserialize_compact(tampered, public, algorithms=[jose_alg])
