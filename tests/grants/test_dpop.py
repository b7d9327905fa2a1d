"""RFC 9449 DPoP proofs: the RFC's own example, joserfc interop and every refusal by its check.

Time comes from the ``clock`` fixture (``tests/conftest.py``); nothing sleeps.
"""

from __future__ import annotations

import base64
import json
import threading
from typing import Any, Protocol

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jws
from joserfc.jwk import ECKey, OKPKey

from keygrants.auth.credentials import jwk_thumbprint
from keygrants.crypto import SigningKey, VerifyingKey, b64url, hmac_sha256
from keygrants.crypto.signing import ecdsa_p256_der_to_raw
from keygrants.errors import PopInvalid, PopReplayed, PopRequired, UseDpopNonce
from keygrants.grants.dpop import (
    ALGORITHMS,
    DPOP_TYPE,
    MAX_PROOF_LENGTH,
    DpopProof,
    DpopVerifier,
    access_token_hash,
    htu_of,
    make_proof,
    proof_key_thumbprint,
)


class Clock(Protocol):
    now: float

    def __call__(self) -> float: ...

    def advance(self, seconds: float) -> None: ...


METHOD = "POST"
URL = "https://kms.example.com/v1/keys/k1:encrypt"
TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
KEY_ALGORITHMS = ["ed25519", "ecdsa-p256-sha256"]
B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
JOSE = {"ed25519": ("EdDSA", OKPKey), "ecdsa-p256-sha256": ("ES256", ECKey)}
# joserfc flags "EdDSA" as deprecated by RFC 9864 (in favour of "Ed25519"); RFC 9449 says EdDSA.
EDDSA_DEPRECATED = "ignore:EdDSA is deprecated"

# RFC 9449 §7.1, Figure 12: a proof for a protected resource request, with its access token
# (§7.1) and the thumbprint of its key (§6.1, Figure 9).
RFC_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6Ik"
    "VDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCR"
    "nMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JE"
    "QSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIj"
    "oiR0VUIiwiaHR1IjoiaHR0cHM6Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90ZWN0Z"
    "WRyZXNvdXJjZSIsImlhdCI6MTU2MjI2MjYxOCwiYXRoIjoiZlVIeU8ycjJaM0RaNTNF"
    "c05yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9.2oW9RP35yRqzhrtNP86L-Ey71E"
    "OptxRimPPToA1plemAgR6pxHF8y6-yqyVnmcw6Fy1dqd-jfxSYoMxhAJpLjA"
)
RFC_ACCESS_TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
RFC_ATH = "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
RFC_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
RFC_IAT = 1562262618


# -- helpers -------------------------------------------------------------------------------------


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _decode(proof: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    header, claims, signature = proof.split(".")
    return json.loads(_b64decode(header)), json.loads(_b64decode(claims)), _b64decode(signature)


def _part(value: object) -> str:
    return b64url(json.dumps(value).encode())


def _sign(key: SigningKey, header_b64: str, claims_b64: str) -> str:
    signature = key.sign(f"{header_b64}.{claims_b64}".encode())
    if key.algorithm == "ecdsa-p256-sha256":
        signature = ecdsa_p256_der_to_raw(signature)
    return f"{header_b64}.{claims_b64}.{b64url(signature)}"


def _jose_alg(key: SigningKey) -> str:
    return JOSE[key.algorithm][0]


def _header(key: SigningKey, **changes: Any) -> dict[str, Any]:
    jwk = {m: v for m, v in key.public_key().jwk().items() if m in ("kty", "crv", "x", "y")}
    header = {"typ": DPOP_TYPE, "alg": _jose_alg(key), "jwk": jwk}
    return _apply(header, changes)


def _claims(now: float, **changes: Any) -> dict[str, Any]:
    claims = {"jti": "jti-1", "htm": METHOD, "htu": URL, "iat": int(now),
              "ath": access_token_hash(TOKEN)}
    return _apply(claims, changes)


def _apply(members: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` set members; a value of ``...`` removes one (``x5t#S256`` is ``x5t_S256``)."""
    out = dict(members)
    for name, value in changes.items():
        name = name.replace("_S256", "#S256")
        if value is ...:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def _forge(key: SigningKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A proof with any header and claims, validly signed by ``key``."""
    return _sign(key, _part(header), _part(claims))


def _verify(verifier: DpopVerifier, proof: str | None, key: SigningKey | VerifyingKey, *,
            method: str = METHOD, url: str = URL, access_token: str = TOKEN,
            holder: str | None = None) -> DpopProof:
    return verifier.verify(proof, method=method, url=url, access_token=access_token,
                           expected_jkt=proof_key_thumbprint(key), holder=holder)


def _refused(verifier: DpopVerifier, proof: str | None, key: SigningKey | VerifyingKey,
             match: str, **request: Any) -> None:
    """``verify`` raises exactly :class:`PopInvalid` (not a subclass), with ``match``."""
    with pytest.raises(PopInvalid, match=match) as info:
        _verify(verifier, proof, key, **request)
    assert type(info.value) is PopInvalid
    assert info.value.code == "pop_invalid"


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {alg: SigningKey.generate(alg) for alg in KEY_ALGORITHMS}  # type: ignore[arg-type]


@pytest.fixture(params=KEY_ALGORITHMS)
def key(request: pytest.FixtureRequest, keys: dict[str, SigningKey]) -> SigningKey:
    return keys[request.param]


@pytest.fixture
def other_key() -> SigningKey:
    return SigningKey.generate("ed25519")


@pytest.fixture
def verifier(clock: Clock) -> DpopVerifier:
    return DpopVerifier(clock=clock)


def _proof(key: SigningKey, clock: Clock, **options: Any) -> str:
    options = {"method": METHOD, "url": URL, "access_token": TOKEN, "iat": int(clock.now)} | options
    return make_proof(key, **options)


# -- published values ----------------------------------------------------------------------------


def test_rfc9449_example_proof_verifies() -> None:
    verifier = DpopVerifier(clock=lambda: float(RFC_IAT))
    proof = verifier.verify(RFC_PROOF, method="GET", url="https://resource.example.org/protectedresource",
                            access_token=RFC_ACCESS_TOKEN, expected_jkt=RFC_JKT)
    assert proof == DpopProof(jkt=RFC_JKT, jti="e1j3V_bKic8-LAEB", iat=RFC_IAT, htm="GET",
                              htu="https://resource.example.org/protectedresource")


def test_rfc9449_example_refused_for_another_token_or_key() -> None:
    verifier = DpopVerifier(clock=lambda: float(RFC_IAT))
    request: dict[str, Any] = {"method": "GET", "url": "https://resource.example.org/protectedresource"}
    with pytest.raises(PopInvalid, match="ath does not match"):
        verifier.verify(RFC_PROOF, access_token="other", expected_jkt=RFC_JKT, **request)
    with pytest.raises(PopInvalid, match="signed by another key"):
        verifier.verify(RFC_PROOF, access_token=RFC_ACCESS_TOKEN, expected_jkt="x" * 43, **request)


def test_access_token_hash_rfc9449_example() -> None:
    assert access_token_hash(RFC_ACCESS_TOKEN) == RFC_ATH


def test_thumbprints_match_published_values_and_joserfc(key: SigningKey) -> None:
    # RFC 8037 §A.3: the thumbprint of the Ed25519 key of §A.2.
    rfc8037 = VerifyingKey.from_raw("ed25519", _b64decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"))
    assert proof_key_thumbprint(rfc8037) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    public = key.public_key()
    jkt = proof_key_thumbprint(key)
    assert jkt == proof_key_thumbprint(public) == jwk_thumbprint(public.jwk())
    assert jkt == JOSE[key.algorithm][1].import_key(public.jwk()).thumbprint()


def test_rsa_keys_are_not_proof_keys() -> None:
    rsa_key = SigningKey("rsa-pss-3072-sha256", rsa.generate_private_key(65537, 1024))
    with pytest.raises(ValueError, match="Ed25519 or ECDSA P-256"):
        make_proof(rsa_key, method=METHOD, url=URL)
    with pytest.raises(ValueError, match="Ed25519 or ECDSA P-256"):
        proof_key_thumbprint(rsa_key)


# -- the proofs make_proof writes ----------------------------------------------------------------


def test_make_proof_layout(key: SigningKey, clock: Clock) -> None:
    proof = make_proof(key, method="post", url=URL + "?x=1#f", access_token=TOKEN, nonce="n-1",
                       iat=1234, jti="my-jti")
    header, claims, signature = _decode(proof)
    public_jwk = key.public_key().jwk()
    members = ("kty", "crv", "x") if key.algorithm == "ed25519" else ("kty", "crv", "x", "y")
    assert header == {"typ": "dpop+jwt", "alg": _jose_alg(key), "jwk": {m: public_jwk[m] for m in members}}
    assert claims == {"jti": "my-jti", "htm": "POST", "htu": URL, "iat": 1234,
                      "ath": access_token_hash(TOKEN), "nonce": "n-1"}
    assert len(signature) == 64  # Ed25519, and ES256 as raw r || s
    assert ALGORITHMS[header["alg"]] == key.algorithm


def test_make_proof_defaults(key: SigningKey) -> None:
    first, second = (_decode(make_proof(key, method="GET", url=URL))[1] for _ in range(2))
    assert set(first) == {"jti", "htm", "htu", "iat"}  # no ath or nonce unless given
    assert first["jti"] != second["jti"] and len(_b64decode(first["jti"])) == 16
    assert isinstance(first["iat"], int)


def test_make_proof_verifies(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    proof = _verify(verifier, _proof(key, clock, jti="abc"), key)
    assert proof == DpopProof(jkt=proof_key_thumbprint(key), jti="abc", iat=int(clock.now),
                              htm=METHOD, htu=URL)


@pytest.mark.filterwarnings(EDDSA_DEPRECATED)
def test_make_proof_verifies_with_joserfc(key: SigningKey, clock: Clock) -> None:
    proof = _proof(key, clock)
    header = _decode(proof)[0]
    alg, key_class = JOSE[key.algorithm]
    verified = jws.deserialize_compact(proof, key_class.import_key(header["jwk"]), algorithms=[alg])
    assert json.loads(verified.payload)["ath"] == access_token_hash(TOKEN)
    assert verified.headers()["typ"] == DPOP_TYPE


@pytest.mark.filterwarnings(EDDSA_DEPRECATED)
def test_joserfc_proof_verifies(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    alg, key_class = JOSE[key.algorithm]
    jose_key = key_class.import_key(key.private_pem())
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": jose_key.as_dict(private=False)}
    claims = {"jti": "joserfc-1", "htm": "POST", "htu": URL, "iat": int(clock.now),
              "ath": access_token_hash(TOKEN)}
    proof = jws.serialize_compact(header, json.dumps(claims), jose_key, algorithms=[alg])
    assert _verify(verifier, proof, key).jti == "joserfc-1"


# -- one proof, of bounded size ------------------------------------------------------------------


@pytest.mark.parametrize("proof", [None, "", "   "])
def test_missing_proof(key: SigningKey, verifier: DpopVerifier, proof: str | None) -> None:
    with pytest.raises(PopRequired) as info:
        _verify(verifier, proof, key)
    assert info.value.code == "pop_required"


@pytest.mark.parametrize("joiner", [", ", ",", " ", "\t"])
def test_two_proofs_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, joiner: str) -> None:
    two = joiner.join([_proof(key, clock, jti="a"), _proof(key, clock, jti="b")])
    _refused(verifier, two, key, "more than one DPoP proof")


def test_oversized_proof_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    proof = _proof(key, clock, jti="x" * 100, nonce="n" * MAX_PROOF_LENGTH)
    _refused(verifier, proof, key, "too large")


def test_surrounding_whitespace_is_not_a_second_proof(key: SigningKey, clock: Clock,
                                                      verifier: DpopVerifier) -> None:
    assert _verify(verifier, f" {_proof(key, clock)} ", key).htm == METHOD


# -- the compact JWS -----------------------------------------------------------------------------


def _bad_parts(key: SigningKey, clock: Clock) -> list[str]:
    h, c, s = _proof(key, clock).split(".")
    return [
        f"{h}.{c}",  # two parts
        f"{h}.{c}.{s}.{s}",  # four parts
        f"{h}=.{c}.{s}",  # padding
        f"{h}.{c}==.{s}",
        f"{h[:-1]}+.{c}.{s}",  # the standard alphabet
        f"{h}.{c[:-1]}/.{s}",
        f"{h}.{c}.{s}!",
        f"{h}.{c}{'A' * ((1 - len(c)) % 4)}.{s}",  # a length base64 cannot have
        f".{c}.{s}",  # an empty part
        f"{h}..{s}",
        f"{h}.{c}.",
        "\u00e9" + f"{h}.{c}.{s}",  # not ASCII
    ]


def test_bad_base64_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    for proof in _bad_parts(key, clock):
        _refused(verifier, proof, key, "not a compact JWS|signature invalid")


def test_noncanonical_base64_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    # Header JSON of 3n+1 bytes leaves 4 spare bits in its last character: set one.
    header = json.dumps(_header(key)) + " " * ((1 - len(json.dumps(_header(key)))) % 3)
    h = b64url(header.encode())
    assert len(h) % 4 == 2
    noncanonical = h[:-1] + B64URL_ALPHABET[B64URL_ALPHABET.index(h[-1]) | 1]
    assert _b64decode(noncanonical) == _b64decode(h)
    c = _part(_claims(clock.now))
    assert _verify(verifier, _sign(key, h, c), key).jti == "jti-1"
    _refused(verifier, _sign(key, noncanonical, c), key, "not a compact JWS")


@pytest.mark.parametrize("region", ["header", "claims"])
@pytest.mark.parametrize("text", [b"not json", b"[1, 2]", b'"dpop"', b"\xff\xfe{}", b"[" * 5000,
                                  b'{"a": NaN}', b'{"a": 1, "a": 2}'])
def test_non_json_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, region: str,
                          text: bytes) -> None:
    h, c = _part(_header(key)), _part(_claims(clock.now))
    if region == "header":
        h = b64url(text)
    else:
        c = b64url(text)
    _refused(verifier, _sign(key, h, c), key, f"{region} is not a JSON object")


def test_duplicate_alg_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    header = json.dumps(_header(key))[:-1] + ', "alg": "none"}'
    _refused(verifier, _sign(key, b64url(header.encode()), _part(_claims(clock.now))), key,
             "header is not a JSON object")


# -- the header ----------------------------------------------------------------------------------


@pytest.mark.parametrize("typ", ["JWT", "jwt", "DPOP+JWT", "application/dpop+jwt", "dpop", None, ...])
def test_wrong_typ_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, typ: object) -> None:
    _refused(verifier, _forge(key, _header(key, typ=typ), _claims(clock.now)), key, "typ is not dpop\\+jwt")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signed", [False, True])
def test_alg_none_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, alg: str,
                          signed: bool) -> None:
    h, c = _part(_header(key, alg=alg)), _part(_claims(clock.now))
    proof = _sign(key, h, c) if signed else f"{h}.{c}."
    _refused(verifier, proof, key, "alg not accepted")


def test_hs256_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    # The classic confusion: an HMAC keyed with the public key the verifier would use.
    h, c = _part(_header(key, alg="HS256")), _part(_claims(clock.now))
    secret = json.dumps(_header(key)["jwk"]).encode()
    proof = f"{h}.{c}.{b64url(hmac_sha256(secret, f'{h}.{c}'.encode()))}"
    _refused(verifier, proof, key, "alg not accepted")


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES384", "Ed25519", "eddsa", "es256", "", None, 1])
def test_other_algs_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, alg: object) -> None:
    rsa_jwk = {"kty": "RSA", "n": b64url(b"\xc1" * 256), "e": "AQAB"}
    header = _header(key, alg=alg, jwk=rsa_jwk) if alg in ("RS256", "PS256") else _header(key, alg=alg)
    _refused(verifier, _forge(key, header, _claims(clock.now)), key, "alg not accepted")


@pytest.mark.parametrize("member", ["crit", "jku", "x5u", "x5c", "x5t", "x5t_S256"])
def test_forbidden_header_member_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier,
                                         member: str) -> None:
    value: object = ["exp"] if member == "crit" else "https://attacker.example/keys"
    header = _header(key, **{member: value})
    _refused(verifier, _forge(key, header, _claims(clock.now)), key, "header member .* not accepted")


@pytest.mark.parametrize("jwk", [..., None, "a-key", ["x"]])
def test_missing_jwk_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, jwk: object) -> None:
    header = _header(key, jwk=jwk, kid=proof_key_thumbprint(key))  # kid instead of the key
    _refused(verifier, _forge(key, header, _claims(clock.now)), key, "jwk missing")


@pytest.mark.parametrize("member", ["d", "p", "k"])
def test_private_jwk_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, member: str) -> None:
    header = _header(key)
    header["jwk"][member] = b64url(b"\x01" * 32)
    _refused(verifier, _forge(key, header, _claims(clock.now)), key, "jwk holds a private key")


def test_jwk_of_another_type_refused(keys: dict[str, SigningKey], clock: Clock,
                                     verifier: DpopVerifier) -> None:
    ed, ec = keys["ed25519"], keys["ecdsa-p256-sha256"]
    for signer, jwk_key in ((ed, ec), (ec, ed)):
        header = _header(signer, jwk=_header(jwk_key)["jwk"])
        _refused(verifier, _forge(signer, header, _claims(clock.now)), signer, "jwk does not match alg")
    for signer, changes in ((ed, {"crv": "X25519"}), (ec, {"crv": "P-384"}), (ec, {"kty": "OKP"}),
                            (ed, {"alg": "ES256"})):
        header = _header(signer)
        header["jwk"] |= changes
        _refused(verifier, _forge(signer, header, _claims(clock.now)), signer, "jwk does not match alg")


def test_malformed_jwk_refused(keys: dict[str, SigningKey], clock: Clock, verifier: DpopVerifier) -> None:
    ed, ec = keys["ed25519"], keys["ecdsa-p256-sha256"]
    x = _header(ec)["jwk"]["x"]
    cases = [
        (ed, {"x": b64url(b"\x01" * 31)}),
        (ed, {"x": 5}),
        (ec, {"y": ...}),
        (ec, {"x": b64url(b"\x00" + _b64decode(x))}),  # 33 bytes
        (ec, {"y": b64url(b"\x00" * 32)}),  # not on the curve
        (ec, {"x": x + "="}),
    ]
    for signer, changes in cases:
        header = _header(signer)
        header["jwk"] = _apply(header["jwk"], changes)
        _refused(verifier, _forge(signer, header, _claims(clock.now)), signer, "jwk invalid")


def test_unknown_header_members_are_ignored(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    header = _header(key, kid="some-kid")
    header["jwk"] |= {"alg": _jose_alg(key), "use": "sig"}
    assert _verify(verifier, _forge(key, header, _claims(clock.now)), key).jti == "jti-1"


# -- the signature -------------------------------------------------------------------------------


def test_tampered_claims_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    h, _, s = _proof(key, clock).split(".")
    for changes in ({"htm": "DELETE"}, {"jti": "other"}, {"iat": int(clock.now) + 1}):
        tampered = f"{h}.{_part(_claims(clock.now, **changes))}.{s}"
        _refused(verifier, tampered, key, "signature invalid")


def test_every_flipped_character_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    proof = _proof(key, clock)
    for i in range(0, len(proof), 7):
        if proof[i] == ".":
            continue
        flipped = proof[:i] + ("A" if proof[i] != "A" else "B") + proof[i + 1:]
        with pytest.raises(PopInvalid) as info:
            _verify(verifier, flipped, key)
        assert type(info.value) is PopInvalid
    assert _verify(verifier, proof, key).jti  # the untouched proof still passes (jti unspent)


def test_signature_by_another_key_refused(key: SigningKey, other_key: SigningKey, clock: Clock,
                                          verifier: DpopVerifier) -> None:
    # The header names the bound key, but another key signed.
    _refused(verifier, _forge(other_key, _header(key), _claims(clock.now)), key, "signature invalid")


def test_wrong_signature_length_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    h, c, s = _proof(key, clock).split(".")
    for signature in (_b64decode(s)[:-1], _b64decode(s) + b"\x00", b"\x00" * 64):
        _refused(verifier, f"{h}.{c}.{b64url(signature)}", key, "signature invalid")


# -- the claims ----------------------------------------------------------------------------------


@pytest.mark.parametrize("jti", [..., "", "j" * 129, 7, None])
def test_bad_jti_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, jti: object) -> None:
    _refused(verifier, _forge(key, _header(key), _claims(clock.now, jti=jti)), key, "jti missing or invalid")


def test_longest_jti_accepted(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    assert _verify(verifier, _proof(key, clock, jti="j" * 128), key).jti == "j" * 128


@pytest.mark.parametrize("claim", ["htm", "htu"])
@pytest.mark.parametrize("value", [..., None, 1, ["POST"]])
def test_missing_htm_htu_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, claim: str,
                                 value: object) -> None:
    claims = _claims(clock.now, **{claim: value})
    _refused(verifier, _forge(key, _header(key), claims), key, "htm or htu missing")


def test_wrong_htm_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    _refused(verifier, _proof(key, clock), key, "htm does not match", method="GET")
    lower = _forge(key, _header(key), _claims(clock.now, htm="post"))  # methods are case-sensitive
    _refused(verifier, lower, key, "htm does not match")


def test_htm_compared_with_upper_case_method(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    assert _verify(verifier, _proof(key, clock), key, method="post").htm == "POST"


@pytest.mark.parametrize("request_url", [
    "https://kms.example.com/v1/keys/k2:encrypt",  # another path
    "https://kms.example.com/v1/keys/k1:decrypt",
    "https://kms.example.com/v1/keys/k1:encrypt/",
    "https://attacker.example/v1/keys/k1:encrypt",  # another host
    "https://kms.example.com.attacker.example/v1/keys/k1:encrypt",
    "http://kms.example.com/v1/keys/k1:encrypt",  # another scheme
    "https://kms.example.com:8443/v1/keys/k1:encrypt",  # another port
])
def test_wrong_htu_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, request_url: str) -> None:
    _refused(verifier, _proof(key, clock), key, "htu does not match", url=request_url)


@pytest.mark.parametrize(("proof_htu", "request_url"), [
    (URL + "?b=2", URL),  # the proof's htu carries a query
    (URL, URL + "?plaintext=abc"),  # the request does
    (URL + "?b=2#f", URL + "?c=3"),
    (URL + "#frag", URL),
    ("HTTPS://KMS.Example.COM:443/v1/keys/k1:encrypt", URL),
    ("https://kms.example.com/v1/./keys/x/../k1:encrypt", URL),
    ("https://kms.example.com/v1/%6beys/k1:encrypt", URL),
])
def test_htu_compared_normalised(key: SigningKey, clock: Clock, verifier: DpopVerifier, proof_htu: str,
                                 request_url: str) -> None:
    proof = _forge(key, _header(key), _claims(clock.now, htu=proof_htu))
    assert _verify(verifier, proof, key, url=request_url).htu == URL


@pytest.mark.parametrize("proof_htu", ["/v1/keys/k1:encrypt", "kms.example.com/v1", "ftp://kms.example.com/",
                                       "https://user@kms.example.com/v1/keys/k1:encrypt", ""])
def test_unusable_htu_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, proof_htu: str) -> None:
    proof = _forge(key, _header(key), _claims(clock.now, htu=proof_htu))
    _refused(verifier, proof, key, "htu does not match")


def test_unusable_request_url_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    # The host comes from the client's Host header: a bad one is a refusal, not a crash.
    _refused(verifier, _proof(key, clock), key, "request URL cannot be normalised",
             url="https://kms.example.com:99999/")


def test_iat_window(key: SigningKey, clock: Clock) -> None:
    verifier = DpopVerifier(max_age=60, leeway=5, clock=clock)
    now = int(clock.now)
    for n, iat in enumerate((now - 65, now - 30, now, now + 5)):  # both ends are inside
        assert _verify(verifier, _proof(key, clock, iat=iat, jti=f"in-{n}"), key).iat == iat
    _refused(verifier, _proof(key, clock, iat=now - 66, jti="old"), key, "iat too old")
    _refused(verifier, _proof(key, clock, iat=now + 6, jti="future"), key, "iat in the future")


@pytest.mark.parametrize("iat", [..., "1800000000", 1_800_000_000.0, True, None, [1]])
def test_bad_iat_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, iat: object) -> None:
    proof = _forge(key, _header(key), _claims(clock.now, iat=iat))
    _refused(verifier, proof, key, "iat missing or not an integer")


def test_wrong_ath_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    _refused(verifier, _proof(key, clock), key, "ath does not match", access_token=TOKEN + "x")
    _refused(verifier, _proof(key, clock, access_token="another-token"), key, "ath does not match")
    _refused(verifier, _proof(key, clock), key, "ath does not match", access_token="t\u00f6ken")
    unpadded_differently = _forge(key, _header(key), _claims(clock.now, ath=access_token_hash(TOKEN) + "="))
    _refused(verifier, unpadded_differently, key, "ath does not match")


@pytest.mark.parametrize("ath", ["\ud800", "\udfff" + "A" * 42, access_token_hash(TOKEN)[:-1] + "\udc80"],
                         ids=["alone", "first", "last"])
def test_ath_with_a_lone_surrogate_is_pop_invalid(key: SigningKey, other_key: SigningKey, clock: Clock,
                                                   verifier: DpopVerifier, ath: str) -> None:
    """JSON ``"\\ud800"`` decodes to a lone surrogate, which UTF-8 cannot encode: the ``ath`` check
    comes before the key check, so a proof by any key used to make it a server error."""
    for signer in (key, other_key):
        _refused(verifier, _forge(signer, _header(signer), _claims(clock.now, ath=ath)), key,
                 "ath does not match")


def test_jti_with_a_lone_surrogate_is_remembered_like_any_other(key: SigningKey, clock: Clock,
                                                                verifier: DpopVerifier) -> None:
    proof = _forge(key, _header(key), _claims(clock.now, jti="\ud800"))
    assert _verify(verifier, proof, key).jti == "\ud800"
    with pytest.raises(PopReplayed):
        _verify(verifier, proof, key)
    # another lone surrogate is another jti
    assert _verify(verifier, _forge(key, _header(key), _claims(clock.now, jti="\ud801")), key)


@pytest.mark.parametrize("ath", [..., None, 1])
def test_missing_ath_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier, ath: object) -> None:
    _refused(verifier, _forge(key, _header(key), _claims(clock.now, ath=ath)), key, "ath missing")
    _refused(verifier, make_proof(key, method=METHOD, url=URL, iat=int(clock.now)), key, "ath missing")


def test_proof_from_another_key_refused(key: SigningKey, other_key: SigningKey, clock: Clock,
                                        verifier: DpopVerifier) -> None:
    # A well-formed proof by a key other than the one the grant is bound to.
    _refused(verifier, _proof(other_key, clock), key, "signed by another key")


def test_checks_run_in_rfc_order(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    # Several faults at once: the first check of RFC 9449 §4.3 that fails is the one reported.
    claims = _claims(clock.now, htm="GET", iat=int(clock.now) - 3600, ath=...)
    _refused(verifier, _forge(key, _header(key, typ="JWT"), claims), key, "ath missing")
    claims["ath"] = "wrong"
    _refused(verifier, _forge(key, _header(key, typ="JWT"), claims), key, "typ is not dpop\\+jwt")
    _refused(verifier, _forge(key, _header(key), claims), key, "htm does not match")
    claims["htm"] = METHOD
    _refused(verifier, _forge(key, _header(key), claims), key, "iat too old")
    claims["iat"] = int(clock.now)
    _refused(verifier, _forge(key, _header(key), claims), key, "ath does not match")


# -- replay --------------------------------------------------------------------------------------


def test_replayed_proof_refused(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    proof = _proof(key, clock)
    _verify(verifier, proof, key)
    clock.advance(1)
    with pytest.raises(PopReplayed, match="replayed") as info:
        _verify(verifier, proof, key)
    assert info.value.code == "pop_replayed"
    # The jti, not the proof, is what is spent: a fresh proof reusing it is refused too.
    with pytest.raises(PopReplayed):
        _verify(verifier, _proof(key, clock, jti=_decode(proof)[1]["jti"]), key)
    assert _verify(verifier, _proof(key, clock), key)  # a new jti passes


def test_concurrent_replays_admit_one(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    proof = _proof(key, clock)
    outcomes: list[str] = []

    def present() -> None:
        try:
            _verify(verifier, proof, key)
            outcomes.append("accepted")
        except PopReplayed:
            outcomes.append("replayed")

    threads = [threading.Thread(target=present) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["accepted"] + ["replayed"] * 15


def test_jti_is_spent_only_by_a_proof_that_passed(key: SigningKey, clock: Clock,
                                                  verifier: DpopVerifier) -> None:
    proof = _proof(key, clock)
    _refused(verifier, proof, key, "ath does not match", access_token="another-token")
    _refused(verifier, proof, key, "htm does not match", method="GET")
    assert _verify(verifier, proof, key).jti == _decode(proof)[1]["jti"]


def test_same_jti_from_another_key_is_not_a_replay(key: SigningKey, other_key: SigningKey, clock: Clock,
                                                   verifier: DpopVerifier) -> None:
    _verify(verifier, _proof(key, clock, jti="shared"), key)
    assert _verify(verifier, _proof(other_key, clock, jti="shared"), other_key).jti == "shared"


def test_jti_remembered_for_the_whole_acceptance_window(key: SigningKey, clock: Clock) -> None:
    verifier = DpopVerifier(max_age=60, leeway=5, clock=clock)
    now = int(clock.now)
    _verify(verifier, _proof(key, clock, iat=now + 5, jti="early"), key)  # as early as allowed
    clock.advance(70)  # iat + max_age + leeway: the proof is still acceptable
    with pytest.raises(PopReplayed):
        _verify(verifier, _proof(key, clock, iat=now + 5, jti="early"), key)


def test_replay_cache_stays_bounded(clock: Clock) -> None:
    verifier = DpopVerifier(max_replay_entries=64, clock=clock)
    signers = [SigningKey.generate("ed25519") for _ in range(40)]
    accepted = 0
    for n in range(400):  # a burst: far more proofs than the cache holds, all at once
        signer = signers[n % len(signers)]
        try:
            _verify(verifier, _proof(signer, clock, jti=f"jti-{n}"), signer)
            accepted += 1
        except PopReplayed as exc:
            assert "cache full" in exc.message
        assert len(verifier._replay) <= 64
    assert accepted == 64


def test_replay_entries_expire(clock: Clock) -> None:
    verifier = DpopVerifier(max_age=60, leeway=5, max_replay_entries=64, clock=clock)
    key = SigningKey.generate("ed25519")
    # One proof every 5 s for 10000 s: 15 windows' worth stay remembered (70 s / 5 s + 1),
    # within this key's share of the cache (a quarter: 16), and none is ever refused.
    for n in range(2000):
        _verify(verifier, _proof(key, clock, jti=f"jti-{n}"), key)
        assert len(verifier._replay) <= 15
        clock.advance(5)


def test_full_replay_cache_fails_closed(clock: Clock) -> None:
    verifier = DpopVerifier(max_replay_entries=8, clock=clock)
    signers = [SigningKey.generate("ed25519") for _ in range(5)]
    for signer in signers[:4]:
        for n in range(2):  # each key may hold a quarter of the cache
            _verify(verifier, _proof(signer, clock, jti=f"jti-{n}"), signer)
        with pytest.raises(PopReplayed, match="cache full"):
            _verify(verifier, _proof(signer, clock, jti="one-too-many"), signer)
    with pytest.raises(PopReplayed, match="cache full"):
        _verify(verifier, _proof(signers[4], clock), signers[4])
    assert len(verifier._replay) == 8
    clock.advance(71)  # every entry's window has passed
    assert _verify(verifier, _proof(signers[4], clock), signers[4])
    assert len(verifier._replay) == 1


def test_one_holders_proof_keys_share_one_quota_of_the_replay_cache(clock: Clock) -> None:
    """Proof keys cost nothing (token exchange binds a new one at will): with a share per key,
    one grant holder filled the cache and every other client's proofs were refused."""
    verifier = DpopVerifier(max_replay_entries=8, clock=clock)  # 2 per holder
    minted = [SigningKey.generate("ed25519") for _ in range(4)]
    for n, signer in enumerate(minted):
        proof = _proof(signer, clock, jti=f"m-{n}")
        if n < 2:
            _verify(verifier, proof, signer, holder="mallory")
        else:
            with pytest.raises(PopReplayed, match="cache full"):
                _verify(verifier, proof, signer, holder="mallory")
    victim = SigningKey.generate("ed25519")
    assert _verify(verifier, _proof(victim, clock), victim, holder="victim")


# -- server nonces -------------------------------------------------------------------------------


@pytest.fixture
def nonce_verifier(clock: Clock) -> DpopVerifier:
    return DpopVerifier(require_nonce=True, nonce_lifetime=300, clock=clock)


def test_nonce_flow(key: SigningKey, clock: Clock, nonce_verifier: DpopVerifier) -> None:
    with pytest.raises(UseDpopNonce, match="nonce required") as info:
        _verify(nonce_verifier, _proof(key, clock), key)
    assert (info.value.code, info.value.status) == ("use_dpop_nonce", 401)
    nonce = info.value.nonce
    assert nonce
    clock.advance(10)
    assert _verify(nonce_verifier, _proof(key, clock, nonce=nonce), key)
    clock.advance(290)  # the last second of the nonce's life
    assert _verify(nonce_verifier, _proof(key, clock, nonce=nonce), key)
    clock.advance(1)
    with pytest.raises(UseDpopNonce, match="invalid or expired") as info:
        _verify(nonce_verifier, _proof(key, clock, nonce=nonce), key)
    assert info.value.nonce and info.value.nonce != nonce
    assert _verify(nonce_verifier, _proof(key, clock, nonce=info.value.nonce), key)


def test_nonce_layout(clock: Clock, nonce_verifier: DpopVerifier) -> None:
    raw = _b64decode(nonce_verifier.new_nonce())
    assert len(raw) == 41
    assert raw[0] == 1
    assert int.from_bytes(raw[1:9], "big") == int(clock.now)


def test_forged_nonces_refused(key: SigningKey, clock: Clock, nonce_verifier: DpopVerifier) -> None:
    good = _b64decode(nonce_verifier.new_nonce())
    elsewhere = DpopVerifier(require_nonce=True, clock=clock).new_nonce()  # another nonce key
    forged = [
        elsewhere,
        b64url(good[:-1] + bytes([good[-1] ^ 1])),  # tag
        b64url(good[:1] + (int(clock.now) + 1).to_bytes(8, "big") + good[9:]),  # issued time
        b64url(b"\x02" + good[1:]),  # version
        b64url(good[:-1]),
        b64url(good) + "=",
        "n" * 55,
        "n" * 65,
        "",
    ]
    for nonce in forged:
        with pytest.raises(UseDpopNonce, match="invalid or expired"):
            _verify(nonce_verifier, _proof(key, clock, nonce=nonce), key)
    for value in (None, 7, ["x"]):
        proof = _forge(key, _header(key), _claims(clock.now, nonce=value))
        with pytest.raises(UseDpopNonce, match="invalid or expired"):
            _verify(nonce_verifier, proof, key)


def test_nonce_from_the_future_refused(key: SigningKey, clock: Clock) -> None:
    secret = b"k" * 32
    ahead = DpopVerifier(nonce_key=secret, clock=lambda: clock.now + 60)
    verifier = DpopVerifier(require_nonce=True, leeway=5, nonce_key=secret, clock=clock)
    with pytest.raises(UseDpopNonce):
        _verify(verifier, _proof(key, clock, nonce=ahead.new_nonce()), key)


def test_shared_nonce_key(key: SigningKey, clock: Clock) -> None:
    # Processes behind one address share the nonce key, so each accepts the others' nonces.
    first, second = (DpopVerifier(require_nonce=True, nonce_key=b"s" * 32, clock=clock) for _ in range(2))
    assert _verify(second, _proof(key, clock, nonce=first.new_nonce()), key)


def test_nonce_ignored_unless_required(key: SigningKey, clock: Clock, verifier: DpopVerifier) -> None:
    assert _verify(verifier, _proof(key, clock, nonce="anything"), key)


def test_nonce_checked_after_the_signature(key: SigningKey, other_key: SigningKey, clock: Clock,
                                           nonce_verifier: DpopVerifier) -> None:
    # An unsigned proof without a nonce is refused for what it is, not answered with a nonce.
    h, c = _part(_header(key, alg="none")), _part(_claims(clock.now))
    _refused(nonce_verifier, f"{h}.{c}.", key, "alg not accepted")
    _refused(nonce_verifier, _forge(other_key, _header(key), _claims(clock.now)), key, "signature invalid")


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"max_age": 0}, {"leeway": -1}, {"nonce_lifetime": 0}, {"max_replay_entries": 0},
    {"max_age": 60, "leeway": 5, "replay_window": 69}, {"nonce_key": b"short"},
])
def test_bad_configuration_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DpopVerifier(**options)


def test_algorithms_are_read_only() -> None:
    assert dict(ALGORITHMS) == {"EdDSA": "ed25519", "ES256": "ecdsa-p256-sha256"}
    with pytest.raises(TypeError):
        ALGORITHMS["HS256"] = "ed25519"  # type: ignore[index]


# -- htu_of --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "htu"), [
    ("https://kms.example.com/v1/keys", "https://kms.example.com/v1/keys"),
    ("HTTPS://KMS.Example.COM/v1/Keys", "https://kms.example.com/v1/Keys"),  # the path keeps its case
    ("https://kms.example.com:443/a", "https://kms.example.com/a"),
    ("http://kms.example.com:80/a", "http://kms.example.com/a"),
    ("http://kms.example.com:443/a", "http://kms.example.com:443/a"),  # not http's default
    ("https://kms.example.com:8443/a", "https://kms.example.com:8443/a"),
    ("https://kms.example.com:/a", "https://kms.example.com/a"),
    ("https://kms.example.com", "https://kms.example.com/"),
    ("https://kms.example.com?x=1", "https://kms.example.com/"),
    ("https://kms.example.com/a/?x=1&y=2#frag", "https://kms.example.com/a/"),
    ("https://kms.example.com/a#frag?not-a-query", "https://kms.example.com/a"),
    ("https://kms.example.com/%7ealice/%2fx%3a", "https://kms.example.com/~alice/%2Fx%3A"),
    ("https://kms.example.com/a/./b/../c", "https://kms.example.com/a/c"),
    ("https://kms.example.com/a/%2E%2E/b", "https://kms.example.com/b"),
    ("https://kms.example.com/a/..", "https://kms.example.com/"),
    ("https://kms.example.com/a/b/.", "https://kms.example.com/a/b/"),
    ("https://kms.example.com/../../etc", "https://kms.example.com/etc"),
    ("https://kms.example.com//a", "https://kms.example.com//a"),
    ("https://[::1]:443/x", "https://[::1]/x"),
    ("https://[2001:DB8::1]:8443/x", "https://[2001:db8::1]:8443/x"),
    ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
])
def test_htu_of(url: str, htu: str) -> None:
    assert htu_of(url) == htu
    assert htu_of(htu) == htu  # idempotent


@pytest.mark.parametrize("url", [
    "", "/v1/keys", "kms.example.com/v1", "ftp://kms.example.com/", "urn:example:a",
    "https://user:pw@kms.example.com/", "https:///v1", "https://:443/v1",
    "https://kms.example.com:99999/", "https://kms.example.com:port/", "https://[::1/",
    "https://kms example.com/", "https://kms.example.com/\u00e9", "https://kms.example.com/\t",
])
def test_htu_of_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        htu_of(url)
