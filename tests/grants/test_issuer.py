"""Issuer keys and their staged rollover: publish, wait one refresh interval, sign, retire after
the longest token lifetime. Every time is passed in; nothing sleeps."""

from __future__ import annotations

import hashlib
import json
import re

import msgspec
import pytest

from keygrants.crypto.signing import SigningKey, b64url
from keygrants.errors import GrantUnknownKey
from keygrants.grants.issuer import (
    ISSUER_ALG,
    IssuerKey,
    IssuerKeyring,
    issuer_secret_name,
    new_issuer_key,
)
from keygrants.grants.model import Grant
from keygrants.grants.token import KID_PATTERN, IssuerPublicKey, decode_grant_token, encode_grant_token

T0 = 1_800_000_000  # the first key is created
REFRESH = 300  # one JWKS refresh interval
MAX_LIFETIME = 3600  # the longest token lifetime
LEEWAY = 30
PERIOD = 86_400  # the rotation period
ISSUER = "https://kms.example.com"
AUDIENCE = "kms"


def _rfc7638(public_raw: bytes) -> str:
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": b64url(public_raw)},
                           separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def _key(seq: int, created_at: int, activate_at: int | None = None,
         retire_at: int | None = None) -> tuple[IssuerKey, SigningKey]:
    key, signing = new_issuer_key(seq, created_at, created_at if activate_at is None else activate_at)
    if retire_at is not None:
        key = msgspec.structs.replace(key, retire_at=retire_at)
    return key, signing


def _ring(*pairs: tuple[IssuerKey, SigningKey]) -> IssuerKeyring:
    return IssuerKeyring([k for k, _ in pairs], {k.kid: s for k, s in pairs})


def _kids(ring: IssuerKeyring, now: int) -> list[str]:
    return [jwk["kid"] for jwk in ring.jwks(now)["keys"]]  # type: ignore[index, union-attr]


def _rotate(first: tuple[IssuerKey, SigningKey], at: int) -> tuple[
        tuple[IssuerKey, SigningKey], tuple[IssuerKey, SigningKey], int]:
    """What the service does at ``at``: stage a successor, plan the old key's retirement."""
    ring = _ring(first)
    activate_at = at + REFRESH
    second = _key(first[0].seq + 1, at, activate_at)
    (kid, retire_at), = ring.plan_retirements(at, activate_at, MAX_LIFETIME, LEEWAY)
    assert kid == first[0].kid
    old = (msgspec.structs.replace(first[0], retire_at=retire_at), first[1])
    return old, second, retire_at


# -- new_issuer_key ------------------------------------------------------------------------------


def test_new_issuer_key_fields() -> None:
    key, signing = new_issuer_key(7, T0, T0 + REFRESH)
    assert key.alg == ISSUER_ALG == "EdDSA"
    assert key.seq == 7
    assert (key.created_at, key.activate_at, key.retire_at) == (T0, T0 + REFRESH, None)
    assert key.sealed == b""  # the service seals the private half
    assert signing.algorithm == "ed25519"
    assert key.public_raw == signing.public_key().public_raw()
    assert len(key.public_raw) == 32


def test_the_kid_is_the_rfc7638_thumbprint_and_matches_the_kid_pattern() -> None:
    key, _ = new_issuer_key(1, T0, T0)
    assert key.kid == _rfc7638(key.public_raw)
    assert re.fullmatch(KID_PATTERN[1:-1], key.kid)
    assert len(key.kid) == 43


def test_every_new_key_is_fresh() -> None:
    kids = {new_issuer_key(1, T0, T0)[0].kid for _ in range(20)}
    assert len(kids) == 20


def test_issuer_secret_name_binds_the_kid() -> None:
    assert issuer_secret_name("abc") == "issuer-key:abc"
    assert issuer_secret_name("abc") != issuer_secret_name("abd")


def test_issuer_key_round_trips_through_msgpack_and_is_frozen() -> None:
    key, _ = _key(3, T0, T0 + 5, retire_at=T0 + 10)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(key), type=IssuerKey) == key
    with pytest.raises(AttributeError):
        key.retire_at = None  # type: ignore[misc]


@pytest.mark.parametrize(("now", "live"), [
    (T0 - 1, False), (T0, True), (T0 + 50, True), (T0 + 99, True), (T0 + 100, False),
    (T0 + 10**6, False),
])
def test_live_from_created_at_until_retire_at(now: int, live: bool) -> None:
    key, _ = _key(1, T0, T0 + 10, retire_at=T0 + 100)
    assert key.live(now) is live


def test_a_key_without_retire_at_stays_live() -> None:
    key, _ = _key(1, T0)
    assert key.live(T0 + 10**9)
    assert not key.live(T0 - 1)


# -- an empty keyring ----------------------------------------------------------------------------


def test_an_empty_keyring() -> None:
    ring = IssuerKeyring([], {})
    assert ring.seq == 0
    assert ring.signer(T0) is None
    assert ring.verification_keys(T0) == {}
    assert ring.jwks(T0) == {"keys": [], "seq": 0}
    assert ring.pending(T0) is None
    assert ring.rotation_due(T0, PERIOD)
    assert list(ring.plan_retirements(T0, T0 + REFRESH, MAX_LIFETIME, LEEWAY)) == []


# -- the first key -------------------------------------------------------------------------------


def test_the_first_key_signs_at_once() -> None:
    first = _key(1, T0)
    ring = _ring(first)
    signer = ring.signer(T0)
    assert signer is not None
    assert signer[0] == first[0] and signer[1] is first[1]
    assert ring.pending(T0) is None
    assert ring.signer(T0 - 1) is None  # not created yet
    assert ring.verification_keys(T0 - 1) == {}


def test_rotation_is_due_after_the_period() -> None:
    ring = _ring(_key(1, T0))
    assert not ring.rotation_due(T0, PERIOD)
    assert not ring.rotation_due(T0 + PERIOD - 1, PERIOD)
    assert ring.rotation_due(T0 + PERIOD, PERIOD)
    assert ring.rotation_due(T0 + 10 * PERIOD, PERIOD)


def test_the_period_counts_from_activation_not_creation() -> None:
    ring = _ring(_key(1, T0, T0 + REFRESH))
    assert not ring.rotation_due(T0 + PERIOD, PERIOD)
    assert ring.rotation_due(T0 + REFRESH + PERIOD, PERIOD)


# -- staged rotation -----------------------------------------------------------------------------


def test_plan_retirements_retires_after_the_longest_token_lifetime() -> None:
    first = _key(1, T0)
    at = T0 + PERIOD
    plan = _ring(first).plan_retirements(at, at + REFRESH, MAX_LIFETIME, LEEWAY)
    assert list(plan) == [(first[0].kid, at + REFRESH + MAX_LIFETIME + LEEWAY)]


def test_plan_retirements_never_postpones_a_planned_retirement() -> None:
    earlier = _key(1, T0, retire_at=T0 + 100)
    later = _key(2, T0, retire_at=T0 + 10**6)
    unplanned = _key(3, T0)
    ring = _ring(earlier, later, unplanned)
    plan = dict(ring.plan_retirements(T0 + 10, T0 + 10 + REFRESH, MAX_LIFETIME, LEEWAY))
    retire_at = T0 + 10 + REFRESH + MAX_LIFETIME + LEEWAY
    assert plan == {earlier[0].kid: T0 + 100, later[0].kid: retire_at, unplanned[0].kid: retire_at}


def test_plan_retirements_skips_retired_and_future_keys() -> None:
    retired = _key(1, T0 - 1000, retire_at=T0)
    live = _key(2, T0 - 500)
    future = _key(3, T0 + 500)
    plan = _ring(retired, live, future).plan_retirements(T0, T0 + REFRESH, MAX_LIFETIME, LEEWAY)
    assert [kid for kid, _ in plan] == [live[0].kid]


def test_staged_rotation_publishes_first_and_signs_after_one_refresh() -> None:
    first = _key(1, T0)
    at = T0 + PERIOD
    old, new, retire_at = _rotate(first, at)
    ring = _ring(old, new)

    # published at once, so verifiers fetch it before the first token it signs
    assert _kids(ring, at) == [old[0].kid, new[0].kid]
    assert set(ring.verification_keys(at)) == {old[0].kid, new[0].kid}
    assert ring.pending(at) == new[0]
    # the old key keeps signing until the new one activates
    for now in (at, at + 1, at + REFRESH - 1):
        signer = ring.signer(now)
        assert signer is not None and signer[0].kid == old[0].kid
        assert not ring.rotation_due(now, PERIOD)  # a successor is staged (period long over)
    assert ring.rotation_due(at, PERIOD) is False

    # then the new one signs
    for now in (at + REFRESH, at + REFRESH + 1, retire_at - 1, retire_at, retire_at + PERIOD - 1):
        signer = ring.signer(now)
        assert signer is not None and signer[0].kid == new[0].kid and signer[1] is new[1]
    assert ring.pending(at + REFRESH) is None
    assert not ring.rotation_due(at + REFRESH, PERIOD)
    assert ring.rotation_due(at + REFRESH + PERIOD, PERIOD)

    # the old key verifies until its retirement, then disappears from the JWKS
    assert set(ring.verification_keys(retire_at - 1)) == {old[0].kid, new[0].kid}
    assert _kids(ring, retire_at - 1) == [old[0].kid, new[0].kid]
    assert set(ring.verification_keys(retire_at)) == {new[0].kid}
    assert _kids(ring, retire_at) == [new[0].kid]


def test_the_last_token_of_the_old_key_verifies_until_it_expires() -> None:
    """The retirement plan covers a token signed at the last moment, for its whole lifetime."""
    first = _key(1, T0)
    at = T0 + PERIOD
    old, new, retire_at = _rotate(first, at)
    ring = _ring(old, new)
    signed_at = at + REFRESH - 1
    signer = ring.signer(signed_at)
    assert signer is not None and signer[0].kid == old[0].kid
    grant = Grant(id="g_" + "a" * 26, key_id="k", grantee="svc", operations=("decrypt",),
                  issuer="admin", created_at=signed_at, not_before=signed_at,
                  expires_at=signed_at + MAX_LIFETIME)
    token = encode_grant_token(grant, issuer=ISSUER, audiences=(AUDIENCE,), issued_at=signed_at,
                               alg=signer[0].alg, kid=signer[0].kid, key=signer[1])
    last_moment = grant.expires_at + LEEWAY - 1
    assert last_moment < retire_at
    claims = decode_grant_token(token, ring.verification_keys(last_moment), issuer=ISSUER,
                                audience=AUDIENCE, now=last_moment, leeway=LEEWAY)
    assert claims.kid == old[0].kid
    with pytest.raises(GrantUnknownKey):
        decode_grant_token(token, ring.verification_keys(retire_at), issuer=ISSUER,
                           audience=AUDIENCE, now=retire_at, leeway=10**6)


def test_a_second_rotation_while_one_is_pending_is_not_due() -> None:
    first = _key(1, T0)
    at = T0 + 10 * PERIOD
    old, new, _ = _rotate(first, at)
    ring = _ring(old, new)
    assert ring.pending(at) is not None
    assert not ring.rotation_due(at, PERIOD)
    assert not ring.rotation_due(at, 0)


def test_only_a_staged_key_and_no_signer_is_not_due() -> None:
    ring = _ring(_key(1, T0, T0 + REFRESH))
    assert ring.signer(T0) is None
    assert ring.pending(T0) is not None
    assert not ring.rotation_due(T0, PERIOD)
    assert ring.rotation_due(T0 + REFRESH + PERIOD, PERIOD)


def test_a_keyring_whose_keys_are_all_retired_needs_a_key() -> None:
    ring = _ring(_key(1, T0, retire_at=T0 + 10))
    assert ring.signer(T0 + 10) is None
    assert ring.rotation_due(T0 + 10, PERIOD)


def test_the_newest_activated_key_signs_whatever_the_input_order() -> None:
    a = _key(1, T0)
    b = _key(2, T0 + 10)
    c = _key(3, T0 + 20, T0 + 20 + REFRESH)
    ring = IssuerKeyring([c[0], a[0], b[0]], {k.kid: s for k, s in (a, b, c)})
    assert [k.seq for k in ring.keys] == [1, 2, 3]
    assert ring.seq == 3
    signer = ring.signer(T0 + 20)
    assert signer is not None and signer[0].kid == b[0].kid
    signer = ring.signer(T0 + 20 + REFRESH)
    assert signer is not None and signer[0].kid == c[0].kid
    assert _kids(ring, T0 + 20) == [a[0].kid, b[0].kid, c[0].kid]


def test_a_key_whose_private_half_is_not_loaded_never_signs() -> None:
    old = _key(1, T0)
    new = _key(2, T0 + 10)
    ring = IssuerKeyring([old[0], new[0]], {old[0].kid: old[1]})
    signer = ring.signer(T0 + 20)
    assert signer is not None and signer[0].kid == old[0].kid
    assert new[0].kid in ring.verification_keys(T0 + 20)  # it may still verify
    assert IssuerKeyring([new[0]], {}).signer(T0 + 20) is None


def test_a_retired_key_never_signs() -> None:
    ring = _ring(_key(1, T0, retire_at=T0 + 100))
    assert ring.signer(T0 + 99) is not None
    assert ring.signer(T0 + 100) is None


# -- verification keys and the JWKS --------------------------------------------------------------


def test_verification_keys_are_the_live_keys() -> None:
    retired = _key(1, T0 - 1000, retire_at=T0)
    current = _key(2, T0 - 500)
    staged = _key(3, T0, T0 + REFRESH)
    future = _key(4, T0 + 1)
    ring = _ring(retired, current, staged, future)
    keys = ring.verification_keys(T0)
    assert set(keys) == {current[0].kid, staged[0].kid}
    for kid, pair in ((current[0].kid, current), (staged[0].kid, staged)):
        public = keys[kid]
        assert isinstance(public, IssuerPublicKey)
        assert (public.kid, public.alg) == (kid, "EdDSA")
        assert public.key.public_raw() == pair[0].public_raw
        assert public.key.verify(b"message", pair[1].sign(b"message"))
    assert set(ring.verification_keys(T0 - 1000)) == {retired[0].kid}
    assert set(ring.verification_keys(T0 + 1)) == {current[0].kid, staged[0].kid, future[0].kid}


def test_verification_keys_follow_the_time_asked_for() -> None:
    """The view is cached per ``now``; asking for another time recomputes it."""
    old = _key(1, T0, retire_at=T0 + 100)
    new = _key(2, T0 + 50)
    ring = _ring(old, new)
    assert set(ring.verification_keys(T0 + 60)) == {old[0].kid, new[0].kid}
    assert set(ring.verification_keys(T0 + 100)) == {new[0].kid}
    assert set(ring.verification_keys(T0 + 60)) == {old[0].kid, new[0].kid}
    assert set(ring.verification_keys(T0)) == {old[0].kid}
    assert ring.verification_keys(T0 + 100) == ring.verification_keys(T0 + 100)


def test_jwks_members() -> None:
    first = _key(1, T0)
    second = _key(2, T0 + 5, T0 + 5 + REFRESH)
    ring = _ring(first, second)
    document = ring.jwks(T0 + 5)
    assert set(document) == {"keys", "seq"}
    assert document["seq"] == 2
    keys = document["keys"]
    assert isinstance(keys, list)
    for jwk, (key, _) in zip(keys, (first, second), strict=True):
        assert jwk == {"kty": "OKP", "crv": "Ed25519", "x": b64url(key.public_raw), "kid": key.kid,
                       "use": "sig", "alg": "EdDSA"}
        assert "d" not in jwk
        assert _rfc7638(key.public_raw) == jwk["kid"]
    json.dumps(document)  # it is served as is


def test_jwks_never_carries_private_material() -> None:
    pair = _key(1, T0)
    text = json.dumps(_ring(pair).jwks(T0))
    private = pair[1].private_bytes()[-32:]  # the Ed25519 seed ends the PKCS#8 encoding
    assert b64url(private) not in text
    assert '"d"' not in text


def test_jwks_seq_is_the_newest_key_s_seq() -> None:
    assert _ring(_key(4, T0)).jwks(T0)["seq"] == 4
    ring = _ring(_key(4, T0, retire_at=T0 + 10), _key(9, T0 + 5))
    assert ring.seq == 9
    assert ring.jwks(T0 + 5)["seq"] == 9
    assert ring.jwks(T0 + 10)["seq"] == 9  # retirement does not move it back


def test_jwks_excludes_retired_and_not_yet_created_keys() -> None:
    retired = _key(1, T0 - 1000, retire_at=T0)
    current = _key(2, T0 - 500)
    future = _key(3, T0 + 1)
    ring = _ring(retired, current, future)
    assert _kids(ring, T0) == [current[0].kid]
    assert _kids(ring, T0 - 1) == [retired[0].kid, current[0].kid]
    assert _kids(ring, T0 + 1) == [current[0].kid, future[0].kid]


def test_pending_is_the_first_staged_key() -> None:
    current = _key(1, T0)
    staged = _key(2, T0 + 10, T0 + 10 + REFRESH)
    ring = _ring(current, staged)
    assert ring.pending(T0 + 9) is None  # not published yet
    assert ring.pending(T0 + 10) == staged[0]
    assert ring.pending(T0 + 10 + REFRESH - 1) == staged[0]
    assert ring.pending(T0 + 10 + REFRESH) is None
    staged_then_retired = _ring(_key(1, T0, T0 + 100, retire_at=T0 + 50))
    assert staged_then_retired.pending(T0 + 50) is None
