"""Grant tokens (``kg+jwt``): the pinned layout, round trips, interoperability with joserfc and
jwcrypto, and every refusal of :func:`decode_grant_token` by its precise error.

Malicious tokens are built by hand: our own header and claims, base64url-encoded, and signed
(with the genuine issuer key, an attacker's key or HMAC) where the check under test comes after
the signature. Every refusal asserts the exact error class and its wire ``code``. Time is
always passed in; nothing sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, KeySet
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jws as jwc_jws
from jwcrypto import jwt as jwc_jwt

from keygrants.crypto.signing import SigningKey, VerifyingKey, b64url, ecdsa_p256_der_to_raw
from keygrants.errors import (
    AudienceMismatch,
    GrantAlgorithmRejected,
    GrantClaimsInvalid,
    GrantDenied,
    GrantExpired,
    GrantHeaderRejected,
    GrantMalformed,
    GrantNotYetValid,
    GrantSignatureInvalid,
    GrantTypeInvalid,
    GrantUnknownKey,
    IssuerMismatch,
)
from keygrants.grants.issuer import IssuerKeyring, new_issuer_key
from keygrants.grants.model import GRANT_OPERATIONS, Grant, GrantClaims
from keygrants.grants.token import (
    GRANT_TOKEN_TYPE,
    JOSE_ALGORITHMS,
    KID_PATTERN,
    MAX_HEADER_LENGTH,
    MAX_TOKEN_LENGTH,
    IssuerPublicKey,
    decode_grant_token,
    encode_grant_token,
    token_header,
)

NOW = 1_800_000_000
ISSUER = "https://kms.example.com"
AUDIENCE = "https://kms.example.com/v1"
OTHER_AUDIENCE = "https://billing.example.com"
LEEWAY = 30
GRANT_ID = "g_" + "a" * 26
PARENT_ID = "g_" + "b" * 26
JKT = b64url(hashlib.sha256(b"the grantee's DPoP key").digest())
X5T = b64url(hashlib.sha256(b"the grantee's client certificate").digest())
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
# joserfc flags "EdDSA" as deprecated by RFC 9864 (in favour of "Ed25519"); the format says EdDSA.
EDDSA_DEPRECATED = "ignore:EdDSA is deprecated"


# -- helpers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    """The one live issuer key of these tests, as the service holds it."""

    kid: str
    signing: SigningKey
    keyring: IssuerKeyring

    @property
    def keys(self) -> dict[str, IssuerPublicKey]:
        return dict(self.keyring.verification_keys(NOW))


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    key, signing = new_issuer_key(1, NOW - 3600, NOW - 3600)
    return Issuer(key.kid, signing, IssuerKeyring([key], {key.kid: signing}))


@pytest.fixture(scope="module")
def attacker() -> SigningKey:
    return SigningKey.generate("ed25519")


@pytest.fixture(scope="module")
def es256() -> SigningKey:
    return SigningKey.generate("ecdsa-p256-sha256")


def _grant(**changes: Any) -> Grant:
    base = Grant(id=GRANT_ID, key_id="key-payments", grantee="svc-billing",
                 operations=("encrypt", "decrypt"), issuer="admin", created_at=NOW - 10,
                 not_before=NOW - 10, expires_at=NOW + 300)
    return msgspec.structs.replace(base, **changes)


def _full_grant() -> Grant:
    """A grant with every optional field that reaches the token set."""
    return _grant(context_equals={"tenant": "42", "region": "eu"}, context_subset={"tenant": "42"},
                  max_uses=10, cnf_jkt=JKT, parent_id=PARENT_ID, trace=TRACE,
                  audiences=(AUDIENCE, OTHER_AUDIENCE))


def _token(issuer: Issuer, grant: Grant | None = None, *, audiences: tuple[str, ...] = (AUDIENCE,),
           issued_at: int = NOW - 10, iss: str = ISSUER) -> str:
    return encode_grant_token(grant if grant is not None else _grant(), issuer=iss,
                              audiences=audiences, issued_at=issued_at, alg="EdDSA",
                              kid=issuer.kid, key=issuer.signing)


def _decode(token: object, keys: Mapping[str, IssuerPublicKey], *, issuer: str = ISSUER,
            audience: str | None = AUDIENCE, now: int = NOW, leeway: int = LEEWAY) -> GrantClaims:
    return decode_grant_token(token, keys, issuer=issuer, audience=audience,  # type: ignore[arg-type]
                              now=now, leeway=leeway)


def _refused(token: object, keys: Mapping[str, IssuerPublicKey], error: type[GrantDenied], code: str,
             **options: Any) -> GrantDenied:
    """Decode ``token`` and check it is refused with exactly ``error`` (and its wire ``code``)."""
    with pytest.raises(GrantDenied) as info:
        _decode(token, keys, **options)
    assert type(info.value) is error, f"{type(info.value).__name__} raised, {error.__name__} expected"
    assert info.value.code == code
    return info.value


def _b64(value: Any) -> str:
    """base64url (unpadded) of ``value``: bytes as they are, anything else as compact JSON."""
    data = value if isinstance(value, bytes) else json.dumps(value, separators=(",", ":")).encode()
    return b64url(data)


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _sign(signing_input: str, key: SigningKey) -> bytes:
    signature = key.sign(signing_input.encode())
    return ecdsa_p256_der_to_raw(signature) if key.algorithm == "ecdsa-p256-sha256" else signature


def _forge(header: Any, claims: Any, *, key: SigningKey | None = None, signature: bytes = b"\0" * 64,
           raw_header: bool = False, raw_claims: bool = False) -> str:
    """A compact JWS of our own making; signed by ``key`` when given, else carrying ``signature``.

    ``raw_header``/``raw_claims``: the part is already an encoded string, used as it is.
    """
    h = header if raw_header else _b64(header)
    c = claims if raw_claims else _b64(claims)
    signing_input = f"{h}.{c}"
    if key is not None:
        signature = _sign(signing_input, key)
    return f"{signing_input}.{b64url(signature)}"


def _header(issuer: Issuer, **members: Any) -> dict[str, Any]:
    return {"alg": "EdDSA", "kid": issuer.kid, "typ": GRANT_TOKEN_TYPE, **members}


def _claims(issuer: Issuer, grant: Grant | None = None) -> dict[str, Any]:
    """The claims of a genuine token, as a mutable dict."""
    claims: dict[str, Any] = json.loads(_unb64(_token(issuer, grant).split(".")[1]))
    return claims


def _parts(token: str) -> tuple[str, str, str]:
    h, c, s = token.split(".")
    return h, c, s


# -- layout --------------------------------------------------------------------------------------


def test_constants_are_pinned() -> None:
    assert GRANT_TOKEN_TYPE == "kg+jwt"
    assert MAX_TOKEN_LENGTH == 8192
    assert MAX_HEADER_LENGTH == 1024
    assert dict(JOSE_ALGORITHMS) == {"EdDSA": "ed25519", "ES256": "ecdsa-p256-sha256"}
    assert KID_PATTERN == r"^[A-Za-z0-9_-]{1,64}$"


def test_token_header_bytes_are_pinned() -> None:
    assert token_header("EdDSA", "kid-1") == b"eyJhbGciOiJFZERTQSIsImtpZCI6ImtpZC0xIiwidHlwIjoia2crand0In0"
    assert _unb64(token_header("ES256", "k").decode()) == b'{"alg":"ES256","kid":"k","typ":"kg+jwt"}'


def test_token_is_three_unpadded_base64url_parts_with_the_pinned_header(issuer: Issuer) -> None:
    token = _token(issuer)
    h, c, s = _parts(token)
    assert h.encode() == token_header("EdDSA", issuer.kid)
    assert json.loads(_unb64(h)) == {"alg": "EdDSA", "kid": issuer.kid, "typ": "kg+jwt"}
    for part in (h, c, s):
        assert part and "=" not in part and "+" not in part and "/" not in part
    assert len(_unb64(s)) == 64


def test_claims_bytes_are_pinned(issuer: Issuer) -> None:
    token = _token(issuer, _full_grant(), audiences=(AUDIENCE, OTHER_AUDIENCE))
    expected = (
        '{"iss":"https://kms.example.com","sub":"svc-billing",'
        '"aud":["https://kms.example.com/v1","https://billing.example.com"],'
        f'"iat":{NOW - 10},"nbf":{NOW - 10},"exp":{NOW + 300},"jti":"{GRANT_ID}",'
        '"kg":{"v":1,"key":"key-payments","ops":["decrypt","encrypt"],'
        '"ctx_eq":{"tenant":"42","region":"eu"},"ctx_sub":{"tenant":"42"},"uses":10,'
        f'"parent":"{PARENT_ID}"}},"cnf":{{"jkt":"{JKT}"}},"trace":"{TRACE}"}}'
    )
    assert _unb64(_parts(token)[1]) == expected.encode()


def test_minimal_claims_carry_no_optional_member(issuer: Issuer) -> None:
    claims = _claims(issuer)
    assert set(claims) == {"iss", "sub", "aud", "iat", "nbf", "exp", "jti", "kg"}
    assert claims["kg"] == {"v": 1, "key": "key-payments", "ops": ["decrypt", "encrypt"]}


def test_signature_is_ed25519_over_the_signing_input(issuer: Issuer) -> None:
    token = _token(issuer)
    h, c, s = _parts(token)
    public = ed25519.Ed25519PublicKey.from_public_bytes(issuer.keyring.keys[0].public_raw)
    public.verify(_unb64(s), f"{h}.{c}".encode())  # raises if it does not verify


def test_es256_signature_is_raw_r_s_over_the_signing_input(es256: SigningKey) -> None:
    token = encode_grant_token(_grant(), issuer=ISSUER, audiences=(AUDIENCE,), issued_at=NOW,
                               alg="ES256", kid="es-1", key=es256)
    h, c, s = _parts(token)
    raw = _unb64(s)
    assert len(raw) == 64
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public = es256.public_key()
    assert public.verify(f"{h}.{c}".encode(), der)
    keys = {"es-1": IssuerPublicKey("es-1", "ES256", public)}
    assert _decode(token, keys).kid == "es-1"


# -- round trips ---------------------------------------------------------------------------------


def test_round_trip_preserves_every_field(issuer: Issuer) -> None:
    grant = _full_grant()
    token = _token(issuer, grant, audiences=grant.audiences, issued_at=NOW - 5)
    claims = _decode(token, issuer.keys)
    assert claims == GrantClaims(
        grant_id=GRANT_ID, issuer=ISSUER, grantee="svc-billing",
        audiences=(AUDIENCE, OTHER_AUDIENCE), issued_at=NOW - 5, not_before=NOW - 10,
        expires_at=NOW + 300, key_id="key-payments", operations=frozenset({"encrypt", "decrypt"}),
        context_equals={"tenant": "42", "region": "eu"}, context_subset={"tenant": "42"},
        max_uses=10, cnf_jkt=JKT, cnf_x5t=None, parent_id=PARENT_ID, trace=TRACE, kid=issuer.kid)


def test_round_trip_of_a_minimal_grant(issuer: Issuer) -> None:
    claims = _decode(_token(issuer), issuer.keys)
    assert claims == GrantClaims(
        grant_id=GRANT_ID, issuer=ISSUER, grantee="svc-billing", audiences=(AUDIENCE,),
        issued_at=NOW - 10, not_before=NOW - 10, expires_at=NOW + 300, key_id="key-payments",
        operations=frozenset({"encrypt", "decrypt"}), kid=issuer.kid)
    assert claims.context_equals is None and claims.context_subset is None
    assert claims.max_uses is None and claims.parent_id is None and claims.trace is None
    assert claims.cnf_jkt is None and claims.cnf_x5t is None


def test_round_trip_of_a_certificate_bound_grant(issuer: Issuer) -> None:
    token = _token(issuer, _grant(cnf_x5t=X5T))
    assert json.loads(_unb64(_parts(token)[1]))["cnf"] == {"x5t#S256": X5T}
    claims = _decode(token, issuer.keys)
    assert claims.cnf_x5t == X5T
    assert claims.cnf_jkt is None


def test_a_dpop_binding_takes_precedence_over_a_certificate_one(issuer: Issuer) -> None:
    token = _token(issuer, _grant(cnf_jkt=JKT, cnf_x5t=X5T))
    assert json.loads(_unb64(_parts(token)[1]))["cnf"] == {"jkt": JKT}
    claims = _decode(token, issuer.keys)
    assert (claims.cnf_jkt, claims.cnf_x5t) == (JKT, None)


def test_empty_context_maps_and_zero_uses_survive_the_round_trip(issuer: Issuer) -> None:
    claims = _decode(_token(issuer, _grant(context_equals={}, context_subset={}, max_uses=0)),
                     issuer.keys)
    assert claims.context_equals == {}
    assert claims.context_subset == {}
    assert claims.max_uses == 0


def test_every_operation_round_trips_sorted(issuer: Issuer) -> None:
    ops = tuple(sorted(GRANT_OPERATIONS, reverse=True))
    token = _token(issuer, _grant(operations=ops))
    assert json.loads(_unb64(_parts(token)[1]))["kg"]["ops"] == sorted(GRANT_OPERATIONS)
    assert _decode(token, issuer.keys).operations == GRANT_OPERATIONS


def test_keys_may_be_any_mapping(issuer: Issuer) -> None:
    assert _decode(_token(issuer), MappingProxyType(issuer.keys)).grant_id == GRANT_ID


# -- interoperability ----------------------------------------------------------------------------


@pytest.mark.filterwarnings(EDDSA_DEPRECATED)
def test_joserfc_verifies_with_the_published_jwks(issuer: Issuer) -> None:
    grant = _full_grant()
    token = _token(issuer, grant, audiences=grant.audiences)
    ours = _decode(token, issuer.keys)
    decoded = jose_jwt.decode(token, KeySet.import_key_set(issuer.keyring.jwks(NOW)),  # type: ignore[arg-type]
                              algorithms=["EdDSA"])
    assert decoded.header == {"alg": "EdDSA", "kid": issuer.kid, "typ": "kg+jwt"}
    c = decoded.claims
    assert (c["iss"], c["sub"], c["jti"], c["iat"], c["nbf"], c["exp"]) == (
        ours.issuer, ours.grantee, ours.grant_id, ours.issued_at, ours.not_before, ours.expires_at)
    assert tuple(c["aud"]) == ours.audiences
    assert c["kg"] == {"v": 1, "key": ours.key_id, "ops": sorted(ours.operations),
                       "ctx_eq": ours.context_equals, "ctx_sub": ours.context_subset,
                       "uses": ours.max_uses, "parent": ours.parent_id}
    assert c["cnf"] == {"jkt": ours.cnf_jkt}
    assert c["trace"] == ours.trace


@pytest.mark.filterwarnings(EDDSA_DEPRECATED)
def test_joserfc_refuses_a_tampered_token(issuer: Issuer) -> None:
    h, _, s = _parts(_token(issuer))
    claims = _claims(issuer)
    claims["sub"] = "svc-attacker"
    with pytest.raises(Exception, match="signature"):
        jose_jwt.decode(f"{h}.{_b64(claims)}.{s}",
                        KeySet.import_key_set(issuer.keyring.jwks(NOW)),  # type: ignore[arg-type]
                        algorithms=["EdDSA"])


@pytest.mark.filterwarnings(EDDSA_DEPRECATED)
def test_joserfc_verifies_an_es256_token(es256: SigningKey) -> None:
    token = encode_grant_token(_grant(), issuer=ISSUER, audiences=(AUDIENCE,), issued_at=NOW,
                               alg="ES256", kid="es-1", key=es256)
    key = ECKey.import_key(es256.public_key().jwk(kid="es-1"))  # type: ignore[arg-type]
    assert jose_jwt.decode(token, key, algorithms=["ES256"]).claims["jti"] == GRANT_ID


def test_jwcrypto_verifies_with_the_published_jwks(issuer: Issuer) -> None:
    grant = _full_grant()
    token = _token(issuer, grant, audiences=grant.audiences)
    ours = _decode(token, issuer.keys)
    keyset = jwc_jwk.JWKSet.from_json(json.dumps(issuer.keyring.jwks(NOW)))
    # check_claims=False: jwcrypto would compare exp/nbf with the wall clock; ours pass ``now``
    verified = jwc_jwt.JWT(jwt=token, key=keyset, algs=["EdDSA"], expected_type="JWS",
                           check_claims=False)
    assert json.loads(verified.header) == {"alg": "EdDSA", "kid": issuer.kid, "typ": "kg+jwt"}
    c = json.loads(verified.claims)
    assert c == _claims(issuer, grant) | {"aud": list(grant.audiences)}
    assert (c["jti"], c["sub"], c["kg"]["key"], c["cnf"]["jkt"]) == (
        ours.grant_id, ours.grantee, ours.key_id, ours.cnf_jkt)

    jws = jwc_jws.JWS()
    jws.deserialize(token)
    jws.verify(keyset.get_key(issuer.kid), alg="EdDSA")
    assert json.loads(jws.payload) == c


def test_jwcrypto_refuses_a_tampered_token(issuer: Issuer) -> None:
    h, _, s = _parts(_token(issuer))
    claims = _claims(issuer)
    claims["kg"]["ops"] = sorted(GRANT_OPERATIONS)
    keyset = jwc_jwk.JWKSet.from_json(json.dumps(issuer.keyring.jwks(NOW)))
    tampered = f"{h}.{_b64(claims)}.{s}"
    # with a key set, jwcrypto reports "no key verifies" as a missing key
    with pytest.raises(jwc_jwt.JWTMissingKey):
        jwc_jwt.JWT(jwt=tampered, key=keyset, algs=["EdDSA"], expected_type="JWS",
                    check_claims=False)
    jws = jwc_jws.JWS()
    jws.deserialize(tampered)
    with pytest.raises(jwc_jws.InvalidJWSSignature):
        jws.verify(keyset.get_key(issuer.kid), alg="EdDSA")


@pytest.mark.filterwarnings(EDDSA_DEPRECATED)
def test_a_token_signed_by_joserfc_with_our_layout_verifies_here(issuer: Issuer) -> None:
    """The other direction: our decoder is not tied to our encoder's exact bytes."""
    from joserfc.jwk import OKPKey

    private = OKPKey.import_key(issuer.signing.private_pem())
    claims = _claims(issuer) | {"sub": "svc-from-joserfc"}
    token = jose_jwt.encode({"typ": "kg+jwt", "kid": issuer.kid, "alg": "EdDSA"}, claims, private,
                            algorithms=["EdDSA"])
    assert _decode(token, issuer.keys).grantee == "svc-from-joserfc"


# -- algorithm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["empty", "junk", "genuine"])
def test_alg_none_is_refused_in_every_casing(issuer: Issuer, alg: str, signature: str) -> None:
    claims = _claims(issuer)
    genuine = _unb64(_parts(_token(issuer))[2])
    sig = {"empty": b"", "junk": b"not a signature", "genuine": genuine}[signature]
    token = _forge(_header(issuer, alg=alg), claims, signature=sig)
    if signature == "empty":
        assert token.endswith(".")
    _refused(token, issuer.keys, GrantAlgorithmRejected, "grant_algorithm_rejected")


@pytest.mark.parametrize("alg", ["none", "NONE"])
def test_alg_none_is_refused_without_a_kid_too(issuer: Issuer, alg: str) -> None:
    token = _forge({"alg": alg, "typ": "kg+jwt"}, _claims(issuer), signature=b"")
    _refused(token, issuer.keys, GrantAlgorithmRejected, "grant_algorithm_rejected")


@pytest.mark.parametrize("secret_form", ["raw", "pem", "der", "jwk-x"])
@pytest.mark.parametrize(("alg", "digest"), [("HS256", hashlib.sha256), ("HS384", hashlib.sha384),
                                             ("HS512", hashlib.sha512)])
def test_hmac_keyed_with_the_issuer_public_key_is_refused(issuer: Issuer, secret_form: str, alg: str,
                                                          digest: Any) -> None:
    """The classic key-confusion attack: the public key, which anyone has, as an HMAC secret."""
    public = VerifyingKey.from_raw("ed25519", issuer.keyring.keys[0].public_raw)
    secret = {"raw": public.public_raw(), "pem": public.public_pem().encode(),
              "der": public.public_der(), "jwk-x": public.jwk()["x"].encode()}[secret_form]
    signing_input = f"{_b64(_header(issuer, alg=alg))}.{_b64(_claims(issuer))}"
    mac = hmac.new(secret, signing_input.encode(), digest).digest()
    token = f"{signing_input}.{b64url(mac)}"
    _refused(token, issuer.keys, GrantAlgorithmRejected, "grant_algorithm_rejected")


@pytest.mark.parametrize("alg", [
    "RS256", "RS512", "PS256", "ES384", "ES512", "ES256K", "Ed25519", "Ed448", "eddsa", "EDDSA",
    "EdDSA ", " EdDSA", "es256", "HS256", "", "EdDSA\x00",
    None, 1, True, ["EdDSA"], {"alg": "EdDSA"},
])
def test_other_algorithms_are_refused(issuer: Issuer, attacker: SigningKey, alg: object) -> None:
    token = _forge(_header(issuer, alg=alg), _claims(issuer), key=attacker)
    _refused(token, issuer.keys, GrantAlgorithmRejected, "grant_algorithm_rejected")


def test_a_header_without_alg_is_refused(issuer: Issuer) -> None:
    header = _header(issuer)
    del header["alg"]
    token = _forge(header, _claims(issuer), key=issuer.signing)
    _refused(token, issuer.keys, GrantAlgorithmRejected, "grant_algorithm_rejected")


def test_es256_is_refused_for_an_eddsa_issuer_key(issuer: Issuer, es256: SigningKey) -> None:
    """The algorithm comes from the key: a P-256 signature under the EdDSA key's kid is refused."""
    token = _forge(_header(issuer, alg="ES256"), _claims(issuer), key=es256)
    _refused(token, issuer.keys, GrantAlgorithmRejected, "grant_algorithm_rejected")


def test_eddsa_is_refused_for_an_es256_issuer_key(issuer: Issuer, attacker: SigningKey,
                                                  es256: SigningKey) -> None:
    keys = {"es-1": IssuerPublicKey("es-1", "ES256", es256.public_key())}
    token = _forge(_header(issuer, kid="es-1"), _claims(issuer), key=attacker)
    _refused(token, keys, GrantAlgorithmRejected, "grant_algorithm_rejected")
    genuine = encode_grant_token(_grant(), issuer=ISSUER, audiences=(AUDIENCE,), issued_at=NOW,
                                 alg="ES256", kid="es-1", key=es256)
    assert _decode(genuine, keys).kid == "es-1"


def test_a_genuine_eddsa_token_is_refused_if_the_key_is_registered_for_es256(issuer: Issuer) -> None:
    token = _token(issuer)
    ed_key = issuer.keys[issuer.kid].key
    _refused(token, {issuer.kid: IssuerPublicKey(issuer.kid, "ES256", ed_key)},
             GrantAlgorithmRejected, "grant_algorithm_rejected")


# -- kid -----------------------------------------------------------------------------------------


class _Lookups(dict[str, IssuerPublicKey]):
    """The verification keys, recording every kid looked up."""

    def __init__(self, keys: Mapping[str, IssuerPublicKey]) -> None:
        super().__init__(keys)
        self.asked: list[object] = []

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.asked.append(key)
        return super().get(key, default)


def test_an_unknown_kid_is_refused(issuer: Issuer, attacker: SigningKey) -> None:
    other_kid = new_issuer_key(2, NOW, NOW)[0].kid
    token = _forge(_header(issuer, kid=other_kid), _claims(issuer), key=attacker)
    keys = _Lookups(issuer.keys)
    _refused(token, keys, GrantUnknownKey, "grant_unknown_kid")
    assert keys.asked == [other_kid]


def test_a_genuine_token_is_refused_when_its_key_is_not_offered(issuer: Issuer) -> None:
    _refused(_token(issuer), {}, GrantUnknownKey, "grant_unknown_kid")


@pytest.mark.parametrize("kid", [
    "../../etc/passwd", "1' OR '1'='1", "a/b", "kid\x00", "a" * 65, "", "a b", "kid;", "kid%00",
    "k\u00efd", "*", ".", "kid\r\n", 123, 1.5, None, True, ["kid"], {"kid": "x"},
])
def test_a_malformed_kid_is_refused_before_any_lookup(issuer: Issuer, kid: object) -> None:
    token = _forge(_header(issuer, kid=kid), _claims(issuer), key=issuer.signing)
    keys = _Lookups(issuer.keys)
    _refused(token, keys, GrantUnknownKey, "grant_unknown_kid")
    assert keys.asked == []


def test_a_missing_kid_is_refused(issuer: Issuer) -> None:
    header = _header(issuer)
    del header["kid"]
    _refused(_forge(header, _claims(issuer), key=issuer.signing), issuer.keys, GrantUnknownKey,
             "grant_unknown_kid")


@pytest.mark.parametrize("suffix", ["\n", " ", "\x00", "="])
def test_a_known_kid_with_a_suffix_does_not_match_it(issuer: Issuer, suffix: str) -> None:
    """No normalization of the kid: ``<kid>\\n`` is not ``<kid>`` (``$`` also matches before a
    final newline, so only the exact lookup stops that one)."""
    token = _forge(_header(issuer, kid=issuer.kid + suffix), _claims(issuer), key=issuer.signing)
    _refused(token, issuer.keys, GrantUnknownKey, "grant_unknown_kid")


def test_a_kid_of_64_characters_is_accepted(issuer: Issuer) -> None:
    kid = "K" * 64
    keys = {kid: IssuerPublicKey(kid, "EdDSA", issuer.signing.public_key())}
    token = encode_grant_token(_grant(), issuer=ISSUER, audiences=(AUDIENCE,), issued_at=NOW,
                               alg="EdDSA", kid=kid, key=issuer.signing)
    assert _decode(token, keys).kid == kid


def test_a_token_of_a_retired_issuer_key_is_refused_after_its_retirement() -> None:
    old, old_signing = new_issuer_key(1, NOW - 10_000, NOW - 10_000)
    new, new_signing = new_issuer_key(2, NOW - 1_000, NOW - 500)
    retire_at = NOW - 10
    old = msgspec.structs.replace(old, retire_at=retire_at)
    ring = IssuerKeyring([old, new], {old.kid: old_signing, new.kid: new_signing})
    signed_at = NOW - 600
    current = ring.signer(signed_at)
    assert current is not None and current[0].kid == old.kid
    token = encode_grant_token(_grant(not_before=signed_at, expires_at=NOW + 3600),
                               issuer=ISSUER, audiences=(AUDIENCE,), issued_at=signed_at,
                               alg="EdDSA", kid=old.kid, key=old_signing)

    before = retire_at - 1
    assert _decode(token, ring.verification_keys(before), now=before).kid == old.kid
    for now in (retire_at, NOW):
        assert old.kid not in ring.verification_keys(now)
        _refused(token, ring.verification_keys(now), GrantUnknownKey, "grant_unknown_kid", now=now)


# -- header members ------------------------------------------------------------------------------


@pytest.mark.parametrize(("member", "value"), [
    ("jku", "https://attacker.example/jwks.json"),
    ("x5u", "https://attacker.example/cert.pem"),
    ("jwk", {"kty": "OKP", "crv": "Ed25519", "x": b64url(bytes(32))}),
    ("x5c", ["MIIBszCCAVmgAwIBAgIUQ"]),
    ("x5t", b64url(hashlib.sha1(b"cert").digest())),  # only the header's shape matters
    ("x5t#S256", X5T),
    ("crit", ["exp"]),
    ("crit", ["kg-unknown-extension"]),
    ("crit", []),
    ("zip", "DEF"),
    ("b64", False),
    ("cty", "JWT"),
    ("nonce", "abc"),
    ("iss", ISSUER),
    ("ALG", "EdDSA"),
    ("Kid", "x"),
    ("", ""),
    ("extra", None),
])
def test_header_members_beyond_alg_kid_typ_are_refused(issuer: Issuer, member: str,
                                                       value: object) -> None:
    token = _forge(_header(issuer, **{member: value}), _claims(issuer), key=issuer.signing)
    _refused(token, issuer.keys, GrantHeaderRejected, "grant_header_rejected")


def test_an_embedded_jwk_signed_by_its_own_key_is_refused(issuer: Issuer, attacker: SigningKey) -> None:
    jwk = attacker.public_key().jwk()
    token = _forge(_header(issuer, jwk=jwk), _claims(issuer), key=attacker)
    _refused(token, issuer.keys, GrantHeaderRejected, "grant_header_rejected")
    token = _forge({"alg": "EdDSA", "typ": "kg+jwt", "jwk": jwk}, _claims(issuer), key=attacker)
    _refused(token, issuer.keys, GrantHeaderRejected, "grant_header_rejected")


def test_jku_pointing_at_the_attacker_is_refused(issuer: Issuer, attacker: SigningKey) -> None:
    header = _header(issuer, kid="attacker-1", jku="https://attacker.example/.well-known/jwks.json")
    token = _forge(header, _claims(issuer), key=attacker)
    _refused(token, issuer.keys, GrantHeaderRejected, "grant_header_rejected")


# -- typ -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("typ", [
    "JWT", "jwt", "kg+JWT", "KG+JWT", "Kg+Jwt", "dpop+jwt", "at+jwt", "application/kg+jwt",
    "kg+jwt ", " kg+jwt", "kg+jwt\x00", "kg", "", None, 1, ["kg+jwt"],
])
def test_a_wrong_typ_is_refused(issuer: Issuer, typ: object) -> None:
    token = _forge(_header(issuer, typ=typ), _claims(issuer), key=issuer.signing)
    _refused(token, issuer.keys, GrantTypeInvalid, "grant_type_invalid")


def test_a_missing_typ_is_refused(issuer: Issuer) -> None:
    header = _header(issuer)
    del header["typ"]
    _refused(_forge(header, _claims(issuer), key=issuer.signing), issuer.keys, GrantTypeInvalid,
             "grant_type_invalid")


# -- issuer --------------------------------------------------------------------------------------


ISSUER_VARIANTS = [
    ISSUER[:-1],  # a prefix of ours
    "https://kms.example",
    ISSUER + "/",  # ours is a prefix of it
    ISSUER + ".attacker.example",
    ISSUER[len("https://"):],  # a suffix of ours
    "https://attacker.kms.example.com",  # ours... preceded: ours is not a suffix, theirs ends alike
    "https://evil-" + ISSUER[len("https://"):],
    ISSUER.upper(),
    "https://KMS.example.com",
    "HTTPS://kms.example.com",
    ISSUER + " ",
    " " + ISSUER,
    ISSUER + "\x00",
    "",
]


@pytest.mark.parametrize("token_iss", ISSUER_VARIANTS)
def test_an_issuer_that_is_not_exactly_ours_is_refused(issuer: Issuer, token_iss: str) -> None:
    token = _token(issuer, iss=token_iss)
    _refused(token, issuer.keys, IssuerMismatch, "issuer_mismatch")


@pytest.mark.parametrize("expected", ISSUER_VARIANTS)
def test_our_issuer_is_refused_where_another_is_expected(issuer: Issuer, expected: str) -> None:
    _refused(_token(issuer), issuer.keys, IssuerMismatch, "issuer_mismatch", issuer=expected)


@pytest.mark.parametrize("value", [None, 1, ["https://kms.example.com"]])
def test_an_issuer_of_the_wrong_type_is_invalid(issuer: Issuer, value: object) -> None:
    claims = _claims(issuer) | {"iss": value}
    token = _forge(_header(issuer), claims, key=issuer.signing)
    _refused(token, issuer.keys, GrantClaimsInvalid, "grant_claims_invalid")


# -- audience ------------------------------------------------------------------------------------


@pytest.mark.parametrize("expected", [
    OTHER_AUDIENCE, AUDIENCE + "/", AUDIENCE[:-1], AUDIENCE.upper(), "kms", "", "https://kms.example.com",
])
def test_an_audience_not_in_aud_is_refused(issuer: Issuer, expected: str) -> None:
    _refused(_token(issuer), issuer.keys, AudienceMismatch, "audience_mismatch", audience=expected)


def test_any_listed_audience_is_accepted(issuer: Issuer) -> None:
    token = _token(issuer, audiences=(OTHER_AUDIENCE, AUDIENCE))
    for audience in (AUDIENCE, OTHER_AUDIENCE):
        assert _decode(token, issuer.keys, audience=audience).audiences == (OTHER_AUDIENCE, AUDIENCE)


def test_aud_as_a_string_is_accepted_when_it_matches(issuer: Issuer) -> None:
    claims = _claims(issuer) | {"aud": AUDIENCE}
    token = _forge(_header(issuer), claims, key=issuer.signing)
    assert _decode(token, issuer.keys).audiences == (AUDIENCE,)


@pytest.mark.parametrize("aud", [OTHER_AUDIENCE, AUDIENCE + "x", "x" + AUDIENCE, AUDIENCE[:-1]])
def test_aud_as_a_string_is_compared_whole_not_as_a_substring(issuer: Issuer, aud: str) -> None:
    claims = _claims(issuer) | {"aud": aud}
    token = _forge(_header(issuer), claims, key=issuer.signing)
    _refused(token, issuer.keys, AudienceMismatch, "audience_mismatch")


def test_audience_none_skips_the_check(issuer: Issuer) -> None:
    token = _token(issuer, audiences=(OTHER_AUDIENCE,))
    _refused(token, issuer.keys, AudienceMismatch, "audience_mismatch")
    assert _decode(token, issuer.keys, audience=None).audiences == (OTHER_AUDIENCE,)


def test_sixteen_audiences_are_accepted_and_seventeen_are_invalid(issuer: Issuer) -> None:
    many = tuple(f"https://svc-{i}.example.com" for i in range(17))
    ok = _token(issuer, audiences=(AUDIENCE, *many[:15]))
    assert len(_decode(ok, issuer.keys).audiences) == 16
    too_many = _token(issuer, audiences=(AUDIENCE, *many[:16]))
    _refused(too_many, issuer.keys, GrantClaimsInvalid, "grant_claims_invalid")


def test_an_empty_aud_is_invalid_even_when_audience_is_not_checked(issuer: Issuer) -> None:
    token = _token(issuer, audiences=())
    _refused(token, issuer.keys, GrantClaimsInvalid, "grant_claims_invalid", audience=None)


# -- time ----------------------------------------------------------------------------------------


EXP = NOW + 300
NBF = NOW - 10


@pytest.mark.parametrize("leeway", [0, 5, 30, 300])
def test_expiry_boundary_is_exp_plus_leeway(issuer: Issuer, leeway: int) -> None:
    token = _token(issuer)
    assert _decode(token, issuer.keys, now=EXP + leeway - 1, leeway=leeway).expires_at == EXP
    _refused(token, issuer.keys, GrantExpired, "grant_expired", now=EXP + leeway, leeway=leeway)
    _refused(token, issuer.keys, GrantExpired, "grant_expired", now=EXP + 10**6, leeway=leeway)


@pytest.mark.parametrize("leeway", [0, 5, 30, 300])
def test_not_before_boundary_is_nbf_minus_leeway(issuer: Issuer, leeway: int) -> None:
    token = _token(issuer)
    assert _decode(token, issuer.keys, now=NBF - leeway, leeway=leeway).not_before == NBF
    _refused(token, issuer.keys, GrantNotYetValid, "grant_not_yet_valid", now=NBF - leeway - 1,
             leeway=leeway)
    _refused(token, issuer.keys, GrantNotYetValid, "grant_not_yet_valid", now=0, leeway=leeway)


def test_the_default_leeway_is_thirty_seconds(issuer: Issuer) -> None:
    token = _token(issuer)
    keys = issuer.keys
    claims = decode_grant_token(token, keys, issuer=ISSUER, audience=AUDIENCE, now=EXP + 29)
    assert claims.grant_id == GRANT_ID
    with pytest.raises(GrantExpired):
        decode_grant_token(token, keys, issuer=ISSUER, audience=AUDIENCE, now=EXP + 30)
    with pytest.raises(GrantNotYetValid):
        decode_grant_token(token, keys, issuer=ISSUER, audience=AUDIENCE, now=NBF - 31)


def test_issued_at_is_not_a_validity_bound(issuer: Issuer) -> None:
    """``iat`` is carried (revocation compares it) but the window is ``nbf``..``exp``."""
    token = _token(issuer, issued_at=NOW + 100)
    assert _decode(token, issuer.keys).issued_at == NOW + 100


def test_nbf_after_exp_is_invalid(issuer: Issuer) -> None:
    token = _token(issuer, _grant(not_before=NOW + 301, expires_at=NOW + 300))
    _refused(token, issuer.keys, GrantClaimsInvalid, "grant_claims_invalid")
    same = _token(issuer, _grant(not_before=NOW, expires_at=NOW))
    assert _decode(same, issuer.keys, now=NOW).expires_at == NOW


# -- signature and tampering ---------------------------------------------------------------------


def _set(claims: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    target = claims
    for name in path[:-1]:
        target = target[name]
    target[path[-1]] = value


TAMPERED: list[tuple[tuple[str, ...], Any]] = [
    (("iss",), "https://attacker.example.com"),
    (("sub",), "svc-attacker"),
    (("aud",), [OTHER_AUDIENCE]),
    (("aud",), AUDIENCE),  # same audience, as a string: still different bytes
    (("iat",), NOW + 3600),
    (("nbf",), NOW - 86_400),
    (("exp",), NOW + 86_400 * 365),
    (("jti",), "g_" + "c" * 26),
    (("kg", "key"), "key-root"),
    (("kg", "ops"), sorted(GRANT_OPERATIONS)),
    (("kg", "ctx_eq"), {"tenant": "43", "region": "eu"}),
    (("kg", "ctx_sub"), {}),
    (("kg", "uses"), 1_000_000),
    (("kg", "parent"), "g_" + "d" * 26),
    (("kg", "v"), 2),
    (("cnf", "jkt"), b64url(hashlib.sha256(b"the attacker's DPoP key").digest())),
    (("trace",), "00-00000000000000000000000000000001-0000000000000001-01"),
]


@pytest.mark.parametrize(("path", "value"), TAMPERED, ids=[".".join(p) for p, _ in TAMPERED])
def test_every_claim_is_covered_by_the_signature(issuer: Issuer, path: tuple[str, ...],
                                                 value: Any) -> None:
    grant = _full_grant()
    token = _token(issuer, grant)
    h, _, s = _parts(token)
    claims = _claims(issuer, grant)
    _set(claims, path, value)
    _refused(f"{h}.{_b64(claims)}.{s}", issuer.keys, GrantSignatureInvalid, "grant_signature_invalid")


@pytest.mark.parametrize("path", [("cnf",), ("trace",), ("kg", "uses"), ("kg", "ctx_eq"),
                                  ("kg", "ctx_sub"), ("kg", "parent")])
def test_removing_an_optional_claim_breaks_the_signature(issuer: Issuer, path: tuple[str, ...]) -> None:
    grant = _full_grant()
    h, _, s = _parts(_token(issuer, grant))
    claims = _claims(issuer, grant)
    target = claims
    for name in path[:-1]:
        target = target[name]
    del target[path[-1]]
    _refused(f"{h}.{_b64(claims)}.{s}", issuer.keys, GrantSignatureInvalid, "grant_signature_invalid")


def test_adding_a_claim_breaks_the_signature(issuer: Issuer) -> None:
    h, _, s = _parts(_token(issuer))
    claims = _claims(issuer) | {"admin": True}
    _refused(f"{h}.{_b64(claims)}.{s}", issuer.keys, GrantSignatureInvalid, "grant_signature_invalid")


def test_the_same_claims_serialized_differently_break_the_signature(issuer: Issuer) -> None:
    """The signature is over the bytes, not the meaning."""
    h, _, s = _parts(_token(issuer))
    claims = _claims(issuer)
    for payload in (json.dumps(claims).encode(), json.dumps(claims, separators=(",", ":"),
                                                            sort_keys=True).encode()):
        _refused(f"{h}.{_b64(payload)}.{s}", issuer.keys, GrantSignatureInvalid,
                 "grant_signature_invalid")


def test_a_flipped_bit_in_any_signature_byte_is_refused(issuer: Issuer) -> None:
    h, c, s = _parts(_token(issuer))
    signature = _unb64(s)
    for index in range(len(signature)):
        for bit in (0x01, 0x80):
            flipped = bytearray(signature)
            flipped[index] ^= bit
            _refused(f"{h}.{c}.{b64url(bytes(flipped))}", issuer.keys, GrantSignatureInvalid,
                     "grant_signature_invalid")


@pytest.mark.parametrize("length", [1, 32, 63, 65, 128])
def test_a_signature_of_the_wrong_length_is_refused(issuer: Issuer, length: int) -> None:
    h, c, s = _parts(_token(issuer))
    signature = (_unb64(s) * 2)[:length]
    _refused(f"{h}.{c}.{b64url(signature)}", issuer.keys, GrantSignatureInvalid,
             "grant_signature_invalid")


def test_an_all_zero_signature_is_refused(issuer: Issuer) -> None:
    h, c, _ = _parts(_token(issuer))
    _refused(f"{h}.{c}.{b64url(bytes(64))}", issuer.keys, GrantSignatureInvalid,
             "grant_signature_invalid")


def test_an_empty_signature_part_is_malformed(issuer: Issuer) -> None:
    h, c, _ = _parts(_token(issuer))
    _refused(f"{h}.{c}.", issuer.keys, GrantMalformed, "grant_malformed")


@pytest.mark.parametrize("signature", [
    pytest.param("der", id="der-instead-of-raw"), pytest.param("short", id="63-bytes"),
    pytest.param("long", id="65-bytes"), pytest.param("zero", id="zero-r-s"),
    pytest.param("flipped", id="flipped-s"),
])
def test_a_bad_es256_signature_is_refused(es256: SigningKey, signature: str) -> None:
    keys = {"es-1": IssuerPublicKey("es-1", "ES256", es256.public_key())}
    token = encode_grant_token(_grant(), issuer=ISSUER, audiences=(AUDIENCE,), issued_at=NOW,
                               alg="ES256", kid="es-1", key=es256)
    h, c, s = _parts(token)
    raw = _unb64(s)
    bad = {
        "der": es256.sign(f"{h}.{c}".encode()),
        "short": raw[:63],
        "long": raw + b"\0",
        "zero": bytes(64),
        "flipped": raw[:63] + bytes([raw[63] ^ 1]),
    }[signature]
    _refused(f"{h}.{c}.{b64url(bad)}", keys, GrantSignatureInvalid, "grant_signature_invalid")


def test_an_es256_signature_from_another_p256_key_is_refused(es256: SigningKey) -> None:
    keys = {"es-1": IssuerPublicKey("es-1", "ES256", es256.public_key())}
    other = SigningKey.generate("ecdsa-p256-sha256")
    token = encode_grant_token(_grant(), issuer=ISSUER, audiences=(AUDIENCE,), issued_at=NOW,
                               alg="ES256", kid="es-1", key=other)
    _refused(token, keys, GrantSignatureInvalid, "grant_signature_invalid")


@pytest.fixture(scope="module")
def two_issuers(issuer: Issuer) -> tuple[Issuer, Issuer, dict[str, IssuerPublicKey]]:
    key, signing = new_issuer_key(2, NOW - 100, NOW - 100)
    second = Issuer(key.kid, signing, IssuerKeyring([key], {key.kid: signing}))
    return issuer, second, issuer.keys | second.keys


def test_a_header_swapped_from_another_key_s_token_is_refused(
        two_issuers: tuple[Issuer, Issuer, dict[str, IssuerPublicKey]]) -> None:
    first, second, keys = two_issuers
    h1, _, _ = _parts(_token(first))
    _, c2, s2 = _parts(_token(second))
    assert _decode(_token(second), keys).kid == second.kid
    _refused(f"{h1}.{c2}.{s2}", keys, GrantSignatureInvalid, "grant_signature_invalid")


def test_a_signature_of_another_key_under_our_kid_is_refused(
        two_issuers: tuple[Issuer, Issuer, dict[str, IssuerPublicKey]]) -> None:
    first, second, keys = two_issuers
    token = _forge(_header(first), _claims(first), key=second.signing)
    _refused(token, keys, GrantSignatureInvalid, "grant_signature_invalid")


def test_claims_or_signature_swapped_between_tokens_of_one_key_are_refused(issuer: Issuer) -> None:
    h, c1, s1 = _parts(_token(issuer))
    _, c2, s2 = _parts(_token(issuer, _grant(grantee="svc-other")))
    _refused(f"{h}.{c1}.{s2}", issuer.keys, GrantSignatureInvalid, "grant_signature_invalid")
    _refused(f"{h}.{c2}.{s1}", issuer.keys, GrantSignatureInvalid, "grant_signature_invalid")


def test_an_attacker_signed_token_is_refused(issuer: Issuer, attacker: SigningKey) -> None:
    token = _forge(_header(issuer), _claims(issuer), key=attacker)
    _refused(token, issuer.keys, GrantSignatureInvalid, "grant_signature_invalid")


def test_a_non_canonical_signature_encoding_is_refused(issuer: Issuer) -> None:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    token = _token(issuer)
    last = alphabet.index(token[-1])
    variant = token[:-1] + alphabet[last ^ 0x01]  # a 64-byte signature leaves the low 4 bits unused
    assert _unb64(_parts(variant)[2]) == _unb64(_parts(token)[2])
    _refused(variant, issuer.keys, GrantMalformed, "grant_malformed")


# -- malformed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [
    "", ".", "..", "...", "a", "a.b", "a.b.c.d", "a.b.c.d.e", "....", "eyJ", None, 123,
    b"a.b.c", ["a", "b", "c"],
])
def test_a_token_that_is_not_three_parts_or_not_a_string_is_malformed(issuer: Issuer,
                                                                       token: object) -> None:
    _refused(token, issuer.keys, GrantMalformed, "grant_malformed")


def test_a_genuine_token_with_extra_parts_is_malformed(issuer: Issuer) -> None:
    token = _token(issuer)
    h, c, s = _parts(token)
    for variant in (f"{token}.", f"{token}.{s}", f"{h}.{c}", f"{h}..{c}.{s}", f".{token}"):
        _refused(variant, issuer.keys, GrantMalformed, "grant_malformed")


def _token_of_length(issuer: Issuer, length: int) -> tuple[str, dict[str, IssuerPublicKey]]:
    """A genuinely signed token of exactly ``length`` characters (padded with ``trace``)."""
    public = issuer.signing.public_key()
    for kid_length in range(40, 65):
        kid = "k" * kid_length
        keys = {kid: IssuerPublicKey(kid, "EdDSA", public)}

        def make(n: int, kid: str = kid) -> str:
            return encode_grant_token(_grant(trace="t" * n), issuer=ISSUER, audiences=(AUDIENCE,),
                                      issued_at=NOW, alg="EdDSA", kid=kid, key=issuer.signing)

        base = len(make(0))
        start = max(0, (length - base) * 3 // 4 - 4)
        for n in range(start, start + 10):
            token = make(n)
            if len(token) == length:
                return token, keys
    raise AssertionError(f"no token of length {length}")


def test_a_token_of_exactly_the_maximum_length_is_accepted(issuer: Issuer) -> None:
    token, keys = _token_of_length(issuer, MAX_TOKEN_LENGTH)
    assert len(token) == MAX_TOKEN_LENGTH
    assert _decode(token, keys).grant_id == GRANT_ID


def test_a_token_longer_than_the_maximum_is_malformed_even_if_signed(issuer: Issuer) -> None:
    token, keys = _token_of_length(issuer, MAX_TOKEN_LENGTH + 1)
    _refused(token, keys, GrantMalformed, "grant_malformed")
    _refused("a" * 100_000 + ".b.c", keys, GrantMalformed, "grant_malformed")


def _spaced_header(issuer: Issuer, size: int) -> str:
    """The genuine header members, padded with JSON whitespace to ``size`` bytes."""
    compact = json.dumps(_header(issuer), separators=(",", ":"))
    return b64url((compact[:-1] + " " * (size - len(compact)) + "}").encode())


def test_a_header_longer_than_the_limit_is_malformed_unparsed(issuer: Issuer) -> None:
    claims = _claims(issuer)
    at_limit = _spaced_header(issuer, MAX_HEADER_LENGTH * 3 // 4)
    assert len(at_limit) == MAX_HEADER_LENGTH
    token = _forge(at_limit, claims, key=issuer.signing, raw_header=True)
    assert _decode(token, issuer.keys).grant_id == GRANT_ID
    over = _spaced_header(issuer, MAX_HEADER_LENGTH * 3 // 4 + 1)
    _refused(_forge(over, claims, key=issuer.signing, raw_header=True), issuer.keys,
             GrantMalformed, "grant_malformed")


@pytest.mark.parametrize("depth", [1000, 2500])
def test_a_deeply_nested_header_is_malformed_not_a_server_error(issuer: Issuer, depth: int) -> None:
    """The header is parsed before the signature is checked: anyone can send one nested deep
    enough to exhaust the parser's recursion (a RecursionError used to reach the caller)."""
    header = b64url(('{"alg":"EdDSA","x":' + "[" * depth + "]" * depth + "}").encode())
    token = f"{header}.e30.{b64url(bytes(64))}"
    assert len(token) <= MAX_TOKEN_LENGTH
    _refused(token, issuer.keys, GrantMalformed, "grant_malformed")


def test_a_header_nested_beyond_the_recursion_limit_is_malformed() -> None:
    """The parser's RecursionError is the malformed-token refusal (whatever the length limit)."""
    from keygrants.grants.token import _check_header

    with pytest.raises(GrantMalformed):
        _check_header(b'{"alg":"EdDSA","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}")


@pytest.mark.parametrize("bad", ["+", "/", "!", " ", "=", "==", "\n", "\t", "\u00e9", "%2F", "\x00"])
def test_non_base64url_characters_in_the_header_or_signature_are_malformed(issuer: Issuer,
                                                                           bad: str) -> None:
    h, c, s = _parts(_token(issuer))
    for variant in (f"{h[:10]}{bad}{h[10:]}.{c}.{s}", f"{h}.{c}.{s[:10]}{bad}{s[10:]}",
                    f"{bad}{h}.{c}.{s}"):
        _refused(variant, issuer.keys, GrantMalformed, "grant_malformed")


@pytest.mark.parametrize("bad", ["=", "==", "\n"])
def test_padding_or_a_newline_after_a_part_is_malformed(issuer: Issuer, bad: str) -> None:
    """Even where ``$`` in the part pattern would allow a final newline."""
    h, c, s = _parts(_token(issuer))
    _refused(f"{h}{bad}.{c}.{s}", issuer.keys, GrantMalformed, "grant_malformed")
    _refused(f"{h}.{c}.{s}{bad}", issuer.keys, GrantMalformed, "grant_malformed")


@pytest.mark.parametrize("bad", ["+", "/", "=", "\n", "\x00", "!"])
def test_non_base64url_characters_in_unsigned_claims_are_malformed(issuer: Issuer,
                                                                    bad: str) -> None:
    """The claims part's alphabet is checked before it enters the signing input (its JSON is
    parsed only after the signature check)."""
    h, c, s = _parts(_token(issuer))
    _refused(f"{h}.{c[:10]}{bad}{c[10:]}.{s}", issuer.keys, GrantMalformed, "grant_malformed")


@pytest.mark.parametrize("claims_part", ["ab+c", "abc=", "ab/c", "a", ""])
def test_non_base64url_claims_signed_by_the_issuer_are_malformed(issuer: Issuer, claims_part: str) -> None:
    token = _forge(_header(issuer), claims_part, raw_claims=True, key=issuer.signing)
    _refused(token, issuer.keys, GrantMalformed, "grant_malformed")


@pytest.mark.parametrize("bad", ["\u00e9", "\uff21", "\u2028"])
def test_non_ascii_characters_in_the_claims_part_are_malformed(issuer: Issuer, bad: str) -> None:
    h, c, s = _parts(_token(issuer))
    _refused(f"{h}.{c}{bad}.{s}", issuer.keys, GrantMalformed, "grant_malformed")


@pytest.mark.parametrize("header", [
    b"not json", b"", b"{", b'{"alg":"EdDSA"', b"[]", b'["EdDSA"]', b'"EdDSA"', b"1", b"null",
    b"true", b"\xff\xfe{}", b'{"alg":"EdDSA",}',
])
def test_a_header_that_is_not_a_json_object_is_malformed(issuer: Issuer, header: bytes) -> None:
    token = _forge(header, _claims(issuer), key=issuer.signing)
    _refused(token, issuer.keys, GrantMalformed, "grant_malformed")


def test_a_header_with_an_impossible_base64_length_is_malformed(issuer: Issuer) -> None:
    h, c, s = _parts(_token(issuer))
    assert len(h) % 4 != 1
    bad = h + "A" * ((1 - len(h)) % 4)
    assert len(bad) % 4 == 1
    _refused(f"{bad}.{c}.{s}", issuer.keys, GrantMalformed, "grant_malformed")


# -- claims --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [("iss",), ("sub",), ("aud",), ("iat",), ("nbf",), ("exp",),
                                  ("jti",), ("kg",), ("kg", "key"), ("kg", "ops")])
def test_a_missing_required_claim_is_invalid(issuer: Issuer, path: tuple[str, ...]) -> None:
    claims = _claims(issuer)
    target = claims
    for name in path[:-1]:
        target = target[name]
    del target[path[-1]]
    token = _forge(_header(issuer), claims, key=issuer.signing)
    error = _refused(token, issuer.keys, GrantClaimsInvalid, "grant_claims_invalid")
    assert len(error.message) <= 200


WRONG_TYPES: list[tuple[tuple[str, ...], Any]] = [
    (("sub",), None), (("sub",), 1), (("sub",), ["svc"]),
    (("aud",), 5), (("aud",), [1]), (("aud",), None), (("aud",), {"aud": AUDIENCE}),
    (("iat",), "1800000000"), (("iat",), 1.5), (("iat",), True), (("iat",), None),
    (("nbf",), "x"), (("nbf",), 1e9), (("exp",), None), (("exp",), "never"), (("exp",), [1]),
    (("jti",), 5), (("jti",), None),
    (("kg",), "key-payments"), (("kg",), []), (("kg",), None),
    (("kg", "key"), 1), (("kg", "ops"), "decrypt"), (("kg", "ops"), [1]), (("kg", "ops"), None),
    (("kg", "ctx_eq"), {"tenant": 42}), (("kg", "ctx_eq"), ["tenant"]), (("kg", "ctx_eq"), "t=42"),
    (("kg", "ctx_sub"), {"tenant": None}), (("kg", "ctx_sub"), 1),
    (("kg", "uses"), "3"), (("kg", "uses"), 1.5), (("kg", "uses"), True),
    (("kg", "parent"), 5), (("kg", "v"), "1"),
    (("cnf",), "jkt"), (("cnf",), {"jkt": 1}), (("cnf",), ["jkt"]),
    (("trace",), 5), (("trace",), {"traceparent": TRACE}),
]


@pytest.mark.parametrize(("path", "value"), WRONG_TYPES,
                         ids=[f"{'.'.join(p)}={v!r}" for p, v in WRONG_TYPES])
def test_a_claim_of_the_wrong_type_is_invalid(issuer: Issuer, path: tuple[str, ...], value: Any) -> None:
    claims = _claims(issuer)
    _set(claims, path, value)
    token = _forge(_header(issuer), claims, key=issuer.signing)
    error = _refused(token, issuer.keys, GrantClaimsInvalid, "grant_claims_invalid")
    assert len(error.message) <= 200
    assert token not in error.message


INVALID_VALUES: list[tuple[tuple[str, ...], Any]] = [
    (("aud",), []),
    (("jti",), "not-a-grant-id"),
    (("jti",), "g_" + "A" * 26),
    (("jti",), "g_" + "a" * 25),
    (("jti",), ""),
    (("kg", "ops"), []),
    (("kg", "ops"), ["admin"]),
    (("kg", "ops"), ["decrypt", "Decrypt"]),
    (("kg", "ops"), ["decrypt"] * (len(GRANT_OPERATIONS) + 1)),
    (("kg", "v"), 2),
    (("kg", "v"), 0),
    (("nbf",), EXP + 1),
]


@pytest.mark.parametrize(("path", "value"), INVALID_VALUES,
                         ids=[f"{'.'.join(p)}={v!r}"[:60] for p, v in INVALID_VALUES])
def test_a_claim_with_an_invalid_value_is_invalid(issuer: Issuer, path: tuple[str, ...],
                                                  value: Any) -> None:
    claims = _claims(issuer)
    _set(claims, path, value)
    token = _forge(_header(issuer), claims, key=issuer.signing)
    _refused(token, issuer.keys, GrantClaimsInvalid, "grant_claims_invalid")


@pytest.mark.parametrize("payload", [b"not json", b" ", b"[]", b'"claims"', b"null", b"\xff\xfe",
                                     b'{"iss":'])
def test_claims_that_are_not_a_json_object_are_invalid(issuer: Issuer, payload: bytes) -> None:
    token = _forge(_header(issuer), payload, key=issuer.signing)
    _refused(token, issuer.keys, GrantClaimsInvalid, "grant_claims_invalid")


def test_unknown_claims_and_a_missing_kg_version_are_tolerated(issuer: Issuer) -> None:
    claims = _claims(issuer) | {"extra": {"nested": [1, 2]}, "scope": "admin"}
    del claims["kg"]["v"]
    token = _forge(_header(issuer), claims, key=issuer.signing)
    assert _decode(token, issuer.keys).grant_id == GRANT_ID


# -- order of the checks and opacity -------------------------------------------------------------


def test_checks_run_in_the_documented_order(issuer: Issuer, attacker: SigningKey) -> None:
    """Each pair fails two checks; the earlier one names the refusal."""
    claims = _claims(issuer)
    keys = issuer.keys
    # algorithm before header members
    _refused(_forge(_header(issuer, alg="none", jku="https://x"), claims), keys,
             GrantAlgorithmRejected, "grant_algorithm_rejected")
    # header members before typ
    _refused(_forge(_header(issuer, typ="JWT", jku="https://x"), claims), keys,
             GrantHeaderRejected, "grant_header_rejected")
    # typ before kid
    _refused(_forge(_header(issuer, typ="JWT", kid="../x"), claims), keys,
             GrantTypeInvalid, "grant_type_invalid")
    # kid before the signature
    _refused(_forge(_header(issuer, kid="unknown"), claims, key=attacker), keys,
             GrantUnknownKey, "grant_unknown_kid")
    # signature before the claims
    _refused(_forge(_header(issuer), b"not json", key=attacker), keys,
             GrantSignatureInvalid, "grant_signature_invalid")
    # issuer before the claims' values, audience, expiry
    bad = claims | {"iss": "https://other", "aud": [], "exp": NOW - 1000, "nbf": NOW - 2000}
    _refused(_forge(_header(issuer), bad, key=issuer.signing), keys,
             IssuerMismatch, "issuer_mismatch")
    # claims' values before audience
    bad = claims | {"jti": "nope"}
    _refused(_forge(_header(issuer), bad, key=issuer.signing), keys, GrantClaimsInvalid,
             "grant_claims_invalid", audience="other")
    # audience before expiry
    _refused(_token(issuer), keys, AudienceMismatch, "audience_mismatch", audience="other",
             now=EXP + 1000)


def test_refusals_never_echo_the_token(issuer: Issuer, attacker: SigningKey) -> None:
    genuine = _token(issuer)
    h, c, s = _parts(genuine)
    cases: list[tuple[str, dict[str, Any]]] = [
        (_forge(_header(issuer, alg="none"), _claims(issuer)), {}),
        (_forge(_header(issuer, jku="https://x"), _claims(issuer)), {}),
        (_forge(_header(issuer, typ="JWT"), _claims(issuer)), {}),
        (_forge(_header(issuer, kid="unknown"), _claims(issuer)), {}),
        (f"{h}.{c}.{b64url(bytes(64))}", {}),
        (_forge(_header(issuer), _claims(issuer) | {"iat": "x"}, key=issuer.signing), {}),
        (genuine, {"issuer": "other"}),
        (genuine, {"audience": "other"}),
        (genuine, {"now": EXP + 1000}),
        (genuine, {"now": 0}),
    ]
    for token, options in cases:
        with pytest.raises(GrantDenied) as info:
            _decode(token, issuer.keys, **options)
        text = f"{info.value} {info.value.message} {info.value.to_dict()}"
        for secret in (token, token.split(".")[2], s):
            assert not secret or secret not in text


def test_a_bad_signature_carries_only_the_default_message(issuer: Issuer) -> None:
    h, c, _ = _parts(_token(issuer))
    error = _refused(f"{h}.{c}.{b64url(bytes(64))}", issuer.keys, GrantSignatureInvalid,
                     "grant_signature_invalid")
    assert error.message == GrantSignatureInvalid.default_message


def test_every_refusal_is_a_403_grant_denial() -> None:
    for error in (GrantMalformed, GrantAlgorithmRejected, GrantHeaderRejected, GrantTypeInvalid,
                  GrantUnknownKey, GrantSignatureInvalid, GrantClaimsInvalid, IssuerMismatch,
                  AudienceMismatch, GrantExpired, GrantNotYetValid):
        assert issubclass(error, GrantDenied)
        assert error.status == 403


def test_p256_public_key_helper_is_consistent(es256: SigningKey) -> None:
    """Guard for the ES256 tests above: the key is a P-256 key that signs SHA-256."""
    public = es256.public_key()
    assert public.jwk()["crv"] == "P-256"
    message = b"m"
    der = es256.sign(message)
    key = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), b"\x04" + _unb64(public.jwk()["x"]) + _unb64(public.jwk()["y"]))
    key.verify(der, message, ec.ECDSA(hashes.SHA256()))
