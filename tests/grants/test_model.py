"""The grant record and the pure checks on grants: states, grant ids, the operations a grant
covers, encryption-context constraints (AWS KMS EncryptionContextEquals/Subset semantics) and
attenuation (a sub-grant may only narrow its parent)."""

from __future__ import annotations

import base64
import time
from types import MappingProxyType
from typing import Any

import msgspec
import pytest

from keygrants.errors import AttenuationViolated, ContextMismatch, Forbidden, GrantDenied, InvalidRequest
from keygrants.grants.model import (
    CRYPTO_OPERATIONS,
    GRANT_ID_PATTERN,
    GRANT_OPERATIONS,
    OPERATION_ACTIONS,
    Grant,
    GrantClaims,
    check_attenuation,
    check_constraint_map,
    check_context,
    is_grant_id,
    new_grant_id,
)

NOW = 1_800_000_000
JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
OTHER_JKT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
X5T = "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"


def _grant(**changes: Any) -> Grant:
    base = Grant(id="g_" + "a" * 26, key_id="key-1", grantee="svc-a", operations=("decrypt",),
                 issuer="admin", created_at=NOW - 100, not_before=NOW - 100, expires_at=NOW + 3600)
    return msgspec.structs.replace(base, **changes)


# -- grant ids -----------------------------------------------------------------------------------


def test_new_grant_id_shape() -> None:
    gid = new_grant_id()
    assert gid.startswith("g_") and len(gid) == 28
    assert is_grant_id(gid)
    raw = base64.b32decode(gid[2:].upper() + "======")
    assert len(raw) == 16  # 48 bits of milliseconds, 80 random bits (and 2 zero bits)


def _id_bits(gid: str) -> int:
    return int.from_bytes(base64.b32decode(gid[2:].upper() + "======"), "big")


def test_a_grant_id_starts_with_its_creation_time_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    gid = new_grant_id()
    after = time.time_ns() // 1_000_000
    assert before <= _id_bits(gid) >> 80 <= after


def test_grant_id_layout_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    import keygrants.grants.model as model

    monkeypatch.setattr(model, "nonce_bytes", lambda n: bytes(range(1, n + 1)))
    gid = new_grant_id(0x0123456789AB)
    expected = base64.b32encode(bytes.fromhex("0123456789ab" + "0102030405060708090a") + b"\0")
    assert gid == "g_" + expected.decode().lower()[:26]
    assert gid == "g_aerukz4jvmaqeayeaudaocajbi"


def test_grant_ids_sort_by_creation_time() -> None:
    # the random part never outweighs one millisecond: indexes keyed by id grow at their end
    earlier = [new_grant_id(1_700_000_000_000) for _ in range(200)]
    later = [new_grant_id(1_700_000_000_001) for _ in range(200)]
    assert max(earlier) < min(later)
    assert len(set(earlier)) == 200  # the same millisecond still gives distinct ids


@pytest.mark.parametrize("ms", [-1, 1 << 48])
def test_a_grant_id_time_outside_48_bits_is_refused(ms: int) -> None:
    with pytest.raises(ValueError):
        new_grant_id(ms)


def test_new_grant_ids_are_unique() -> None:
    ids = {new_grant_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(is_grant_id(i) for i in ids)


def test_grant_id_pattern_is_pinned() -> None:
    assert GRANT_ID_PATTERN == r"^g_[a-z2-7]{26}$"


@pytest.mark.parametrize("value", ["g_" + "a" * 26, "g_" + "z" * 26, "g_" + "2" * 26, "g_" + "7" * 26,
                                   "g_abcdefghijklmnopqrstuvwxyz", "g_234567abcdefghijklmnopqrst"])
def test_is_grant_id_accepts_good_ids(value: str) -> None:
    assert is_grant_id(value)


@pytest.mark.parametrize("value", [
    None, 123, 1.5, b"g_" + b"a" * 26, ["g_" + "a" * 26], "", "g_", "g_" + "a" * 25, "g_" + "a" * 27,
    "G_" + "a" * 26, "g_" + "A" * 26, "g-" + "a" * 26, "h_" + "a" * 26, "_" + "a" * 26,
    "g_" + "a" * 25 + "1", "g_" + "a" * 25 + "8", "g_" + "a" * 25 + "0", "g_" + "a" * 25 + "=",
    " g_" + "a" * 26, "g_" + "a" * 26 + " ", "g_" + "a" * 25 + "\x00", "g_" + "a" * 26 + "\x00",
    "g_" + "a" * 25 + "\u00e1", "g_" + "a" * 13 + "/" + "a" * 12, "g_../../" + "a" * 20,
    "g_" + "a" * 26 + "' OR '1'='1",
])
def test_is_grant_id_refuses_bad_values(value: object) -> None:
    assert not is_grant_id(value)


def test_is_grant_id_refuses_a_trailing_newline() -> None:
    assert not is_grant_id(new_grant_id() + "\n")


# -- states --------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["retired", "revoked", "rejected"])
def test_a_state_set_by_an_action_is_reported_as_is(state: str) -> None:
    grant = _grant(state=state, max_uses=1, uses=5, expires_at=NOW - 1)
    assert grant.effective_state(NOW) == state
    assert grant.effective_state(NOW - 10**6) == state


def test_a_pending_request_expires_with_its_requested_window() -> None:
    grant = _grant(state="pending", max_uses=1, uses=5, expires_at=NOW)
    assert grant.effective_state(NOW - 1) == "pending"
    assert grant.effective_state(NOW) == "expired"


def test_an_active_grant_is_active_until_it_expires() -> None:
    grant = _grant()
    assert grant.effective_state(NOW) == "active"
    assert grant.effective_state(grant.expires_at - 1) == "active"
    assert grant.effective_state(grant.expires_at) == "expired"
    assert grant.effective_state(grant.expires_at + 10**6) == "expired"


def test_an_active_grant_is_exhausted_when_its_uses_are_spent() -> None:
    assert _grant(max_uses=3, uses=2).effective_state(NOW) == "active"
    assert _grant(max_uses=3, uses=3).effective_state(NOW) == "exhausted"
    assert _grant(max_uses=3, uses=4).effective_state(NOW) == "exhausted"
    assert _grant(max_uses=0).effective_state(NOW) == "exhausted"
    assert _grant(max_uses=None, uses=10**9).effective_state(NOW) == "active"


def test_exhausted_takes_precedence_over_expired() -> None:
    grant = _grant(max_uses=1, uses=1)
    assert grant.effective_state(grant.expires_at + 1) == "exhausted"


def test_grant_defaults() -> None:
    grant = _grant()
    assert grant.state == "active"
    assert (grant.uses, grant.depth, grant.audiences) == (0, 0, ())
    assert grant.max_uses is None and grant.parent_id is None
    assert grant.requires_approval is False


# -- covers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(CRYPTO_OPERATIONS))
def test_a_crypto_operation_covers_itself_only(op: str) -> None:
    claims = _claims(operations=frozenset({op}))
    assert claims.covers(op)
    for other in (CRYPTO_OPERATIONS | {"describe_key", "get_public_key", "create_grant"}) - {op}:
        assert not claims.covers(other)


def test_describe_covers_key_metadata_and_the_public_key() -> None:
    claims = _claims(operations=frozenset({"describe"}))
    assert claims.covers("describe_key")
    assert claims.covers("get_public_key")
    assert not claims.covers("describe")  # the operation name is not itself an action
    assert not claims.covers("decrypt")
    assert not claims.covers("create_grant")


def test_create_grant_covers_delegation_only() -> None:
    claims = _claims(operations=frozenset({"create_grant"}))
    assert claims.covers("create_grant")
    assert not claims.covers("decrypt")
    assert not claims.covers("describe_key")


def test_covers_nothing_unknown() -> None:
    assert not _claims(operations=frozenset()).covers("decrypt")
    assert not _claims(operations=frozenset({"admin"})).covers("admin")
    everything = _claims(operations=GRANT_OPERATIONS)
    for action in ("", "admin", "delete_key", "DECRYPT", "decrypt ", "revoke_grant"):
        assert not everything.covers(action)


def test_operation_actions_cover_every_grant_operation() -> None:
    assert set(OPERATION_ACTIONS) == GRANT_OPERATIONS
    assert CRYPTO_OPERATIONS | {"describe", "create_grant"} == GRANT_OPERATIONS
    assert OPERATION_ACTIONS["describe"] == frozenset({"describe_key", "get_public_key"})


# -- check_context -------------------------------------------------------------------------------


def _context_refused(context: Any, *, equals: Any = None, subset: Any = None) -> None:
    with pytest.raises(GrantDenied) as info:
        check_context(context, equals=equals, subset=subset)
    assert type(info.value) is ContextMismatch
    assert info.value.code == "context_mismatch"


@pytest.mark.parametrize("context", [None, {}, {"tenant": "42"}, {"a": "1", "b": "2"}])
def test_no_constraint_accepts_any_context(context: Any) -> None:
    check_context(context, equals=None, subset=None)


def test_equals_accepts_exactly_that_map() -> None:
    check_context({"tenant": "42", "region": "eu"}, equals={"region": "eu", "tenant": "42"},
                  subset=None)
    check_context(MappingProxyType({"tenant": "42"}), equals=MappingProxyType({"tenant": "42"}),
                  subset=None)


@pytest.mark.parametrize("context", [
    None, {}, {"tenant": "42"}, {"tenant": "42", "region": "eu", "extra": "x"},
    {"tenant": "43", "region": "eu"}, {"Tenant": "42", "region": "eu"}, {"tenant": "42", "region": "EU"},
    {"tenant": "42 ", "region": "eu"}, {"tenant": "42", "region": ""},
])
def test_equals_refuses_any_other_context(context: Any) -> None:
    _context_refused(context, equals={"tenant": "42", "region": "eu"})


def test_equals_empty_accepts_only_an_empty_context() -> None:
    check_context(None, equals={}, subset=None)
    check_context({}, equals={}, subset=None)
    _context_refused({"a": "1"}, equals={})


@pytest.mark.parametrize("context", [
    {"tenant": "42"}, {"tenant": "42", "region": "eu"}, {"region": "eu", "tenant": "42", "x": ""},
])
def test_subset_accepts_any_context_containing_its_pairs(context: Any) -> None:
    check_context(context, equals=None, subset={"tenant": "42"})


@pytest.mark.parametrize("context", [
    None, {}, {"region": "eu"}, {"tenant": "43"}, {"TENANT": "42"}, {"tenant": "4"}, {"tenant": ""},
])
def test_subset_refuses_a_context_missing_or_changing_a_pair(context: Any) -> None:
    _context_refused(context, subset={"tenant": "42"})


def test_subset_requires_a_pair_with_an_empty_value_to_be_present() -> None:
    check_context({"flag": ""}, equals=None, subset={"flag": ""})
    _context_refused({}, subset={"flag": ""})
    _context_refused(None, subset={"flag": ""})


@pytest.mark.parametrize("context", [None, {}, {"a": "1"}])
def test_subset_empty_accepts_any_context(context: Any) -> None:
    check_context(context, equals=None, subset={})


def test_equals_and_subset_must_both_hold() -> None:
    check_context({"tenant": "42"}, equals={"tenant": "42"}, subset={"tenant": "42"})
    check_context({"tenant": "42", "r": "eu"}, equals={"tenant": "42", "r": "eu"}, subset={"r": "eu"})
    _context_refused({"tenant": "42"}, equals={"tenant": "42"}, subset={"region": "eu"})
    _context_refused({"tenant": "42", "region": "eu"}, equals={"tenant": "42"}, subset={"region": "eu"})


def test_a_context_mismatch_is_a_grant_denial() -> None:
    assert issubclass(ContextMismatch, GrantDenied)
    assert ContextMismatch.status == 403


# -- check_constraint_map ------------------------------------------------------------------------


def test_check_constraint_map_returns_a_copy() -> None:
    assert check_constraint_map(None, "context_equals") is None
    source = MappingProxyType({"tenant": "42"})
    copy = check_constraint_map(source, "context_equals")
    assert copy == {"tenant": "42"} and type(copy) is dict
    assert check_constraint_map({}, "context_subset") == {}


@pytest.mark.parametrize("value", [
    {"tenant": 42}, {1: "x"}, {"": "x"}, {"k" * 257: "v"}, {"k": "v" * 1025}, {"k": None},
    {f"k{i}": "v" for i in range(1000)}, ["tenant"],
])
def test_check_constraint_map_refuses_what_is_not_a_valid_context(value: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_constraint_map(value, "context_subset")
    assert type(info.value) is InvalidRequest
    assert info.value.code == "invalid_request"
    assert info.value.message.startswith("context_subset: ")


# -- check_attenuation ---------------------------------------------------------------------------


def _parent(**changes: Any) -> Grant:
    base = _grant(operations=("create_grant", "decrypt", "describe", "encrypt"),
                  context_subset={"tenant": "42"}, not_before=NOW - 100, expires_at=NOW + 3600,
                  max_uses=10, uses=0, audiences=("svc-a", "svc-b"), cnf_jkt=JKT)
    return msgspec.structs.replace(base, **changes)


def _child(parent: Grant, **changes: Any) -> Grant:
    """An exact copy of ``parent`` as a fresh sub-grant, then ``changes``."""
    child = msgspec.structs.replace(parent, id="g_" + "c" * 26, grantee="svc-child",
                                    parent_id=parent.id, depth=parent.depth + 1, uses=0)
    return msgspec.structs.replace(child, **changes)


def _claims(**changes: Any) -> GrantClaims:
    base = GrantClaims(grant_id="g_" + "a" * 26, issuer="https://kms", grantee="svc-a",
                       audiences=("svc-a",), issued_at=NOW - 100, not_before=NOW - 100,
                       expires_at=NOW + 3600, key_id="key-1", operations=frozenset({"decrypt"}))
    return msgspec.structs.replace(base, **changes)


def _as_claims(parent: Grant) -> GrantClaims:
    return GrantClaims(grant_id=parent.id, issuer="https://kms", grantee=parent.grantee,
                       audiences=parent.audiences, issued_at=parent.created_at,
                       not_before=parent.not_before, expires_at=parent.expires_at,
                       key_id=parent.key_id, operations=frozenset(parent.operations),
                       context_equals=parent.context_equals, context_subset=parent.context_subset,
                       max_uses=parent.max_uses, cnf_jkt=parent.cnf_jkt, cnf_x5t=parent.cnf_x5t)


def _widens(child: Grant, parent: Grant | GrantClaims) -> AttenuationViolated:
    with pytest.raises(Forbidden) as info:
        check_attenuation(child, parent)
    assert type(info.value) is AttenuationViolated
    assert info.value.code == "attenuation_violated"
    return info.value


def test_an_exact_copy_is_allowed() -> None:
    parent = _parent()
    check_attenuation(_child(parent), parent)
    check_attenuation(_child(parent), _as_claims(parent))


def test_an_exact_copy_of_an_unconstrained_parent_is_allowed() -> None:
    parent = _grant()
    check_attenuation(_child(parent), parent)


NARROWER: dict[str, dict[str, Any]] = {
    "fewer-operations": {"operations": ("decrypt",)},
    "no-create-grant": {"operations": ("decrypt", "describe", "encrypt")},
    "tighter-subset": {"context_subset": {"tenant": "42", "region": "eu"}},
    "subset-to-equals": {"context_subset": None, "context_equals": {"tenant": "42"}},
    "equals-with-more": {"context_subset": None, "context_equals": {"tenant": "42", "r": "eu"}},
    "later-start": {"not_before": NOW},
    "earlier-end": {"expires_at": NOW + 60},
    "same-window": {"not_before": NOW - 100, "expires_at": NOW + 3600},
    "fewer-uses": {"max_uses": 1},
    "zero-uses": {"max_uses": 0},
    "fewer-audiences": {"audiences": ("svc-b",)},
    "reordered-audiences": {"audiences": ("svc-b", "svc-a")},
    "bound-to-a-certificate": {"cnf_jkt": None, "cnf_x5t": X5T},
}


@pytest.mark.parametrize("changes", list(NARROWER.values()), ids=list(NARROWER))
def test_a_narrower_sub_grant_is_allowed(changes: dict[str, Any]) -> None:
    parent = _parent()
    check_attenuation(_child(parent, **changes), parent)
    check_attenuation(_child(parent, **changes), _as_claims(parent))


WIDER: dict[str, dict[str, Any]] = {
    "other-key": {"key_id": "key-2"},
    "key-case": {"key_id": "KEY-1"},
    "added-operation": {"operations": ("decrypt", "sign")},
    "all-operations": {"operations": tuple(sorted(GRANT_OPERATIONS))},
    "context-dropped": {"context_subset": None},
    "context-emptied": {"context_subset": {}},
    "context-other-value": {"context_subset": {"tenant": "43"}},
    "context-other-key": {"context_subset": {"region": "eu"}},
    "earlier-start": {"not_before": NOW - 101},
    "later-end": {"expires_at": NOW + 3601},
    "wider-window": {"not_before": NOW - 10**6, "expires_at": NOW + 10**6},
    "unlimited-uses": {"max_uses": None},
    "more-uses": {"max_uses": 11},
    "added-audience": {"audiences": ("svc-a", "svc-b", "svc-c")},
    "other-audience": {"audiences": ("svc-c",)},
    "audiences-dropped": {"audiences": ()},
    "binding-dropped": {"cnf_jkt": None},
}


@pytest.mark.parametrize("changes", list(WIDER.values()), ids=list(WIDER))
def test_a_wider_sub_grant_is_refused(changes: dict[str, Any]) -> None:
    parent = _parent()
    _widens(_child(parent, **changes), parent)
    _widens(_child(parent, **changes), _as_claims(parent))


def test_create_grant_needs_the_parent_to_have_it() -> None:
    parent = _parent(operations=("decrypt",))
    _widens(_child(parent, operations=("create_grant", "decrypt")), parent)
    check_attenuation(_child(parent, operations=("decrypt",)), parent)


def test_an_equals_constraint_cannot_be_loosened() -> None:
    parent = _parent(context_subset=None, context_equals={"tenant": "42", "region": "eu"})
    check_attenuation(_child(parent), parent)
    check_attenuation(_child(parent, context_subset={"tenant": "42"}), parent)
    for changes in ({"context_equals": None},
                    {"context_equals": None, "context_subset": {"tenant": "42", "region": "eu"}},
                    {"context_equals": {"tenant": "42"}},
                    {"context_equals": {"tenant": "42", "region": "eu", "x": "y"}},
                    {"context_equals": {"tenant": "42", "region": "us"}},
                    {"context_equals": {}}):
        _widens(_child(parent, **changes), parent)


def test_an_empty_equals_constraint_is_kept() -> None:
    parent = _parent(context_subset=None, context_equals={})
    check_attenuation(_child(parent), parent)
    _widens(_child(parent, context_equals=None), parent)
    _widens(_child(parent, context_equals={"a": "b"}), parent)


def test_equals_and_subset_in_the_parent_both_bind_the_child() -> None:
    parent = _parent(context_equals={"tenant": "42", "region": "eu"}, context_subset={"tenant": "42"})
    check_attenuation(_child(parent), parent)
    check_attenuation(_child(parent, context_subset=None), parent)
    _widens(_child(parent, context_equals=None), parent)


def test_an_unconstrained_parent_allows_any_context_constraint() -> None:
    parent = _parent(context_subset=None)
    for changes in ({"context_subset": {"a": "1"}}, {"context_equals": {"a": "1"}},
                    {"context_subset": None}, {"context_equals": {}}):
        check_attenuation(_child(parent, **changes), parent)


def test_uses_left_count_what_the_parent_has_spent() -> None:
    parent = _parent(max_uses=10, uses=3)
    check_attenuation(_child(parent, max_uses=7), parent)
    _widens(_child(parent, max_uses=8), parent)
    _widens(_child(parent, max_uses=None), parent)


def test_an_exhausted_parent_leaves_no_uses() -> None:
    parent = _parent(max_uses=10, uses=10)
    check_attenuation(_child(parent, max_uses=0), parent)
    _widens(_child(parent, max_uses=1), parent)
    overspent = _parent(max_uses=10, uses=12)
    _widens(_child(overspent, max_uses=1), overspent)


def test_a_token_parent_is_taken_to_have_every_use_left() -> None:
    """Claims carry no use count; the record (``Grant``) is the one that knows."""
    claims = _as_claims(_parent(max_uses=10, uses=9))
    check_attenuation(_child(_parent(), max_uses=10), claims)
    _widens(_child(_parent(), max_uses=11), claims)


def test_an_unlimited_parent_allows_any_use_limit() -> None:
    parent = _parent(max_uses=None)
    check_attenuation(_child(parent, max_uses=None), parent)
    check_attenuation(_child(parent, max_uses=10**6), parent)


def test_audiences_are_kept_within_the_parents() -> None:
    parent = _parent(audiences=("svc-a",))
    check_attenuation(_child(parent), parent)
    _widens(_child(parent, audiences=("svc-a", "svc-b")), parent)
    _widens(_child(parent, audiences=()), parent)


def test_a_child_of_a_parent_without_audiences_may_have_none() -> None:
    parent = _parent(audiences=())
    check_attenuation(_child(parent), parent)


def test_a_child_of_a_parent_without_audiences_cannot_add_one() -> None:
    parent = _parent(audiences=())
    _widens(_child(parent, audiences=("svc-other",)), parent)


def test_a_bound_parent_needs_a_bound_child() -> None:
    dpop = _parent(cnf_jkt=JKT, cnf_x5t=None)
    cert = _parent(cnf_jkt=None, cnf_x5t=X5T)
    for parent in (dpop, cert):
        _widens(_child(parent, cnf_jkt=None, cnf_x5t=None), parent)
        _widens(_child(parent, cnf_jkt=None, cnf_x5t=None), _as_claims(parent))
        check_attenuation(_child(parent, cnf_jkt=OTHER_JKT, cnf_x5t=None), parent)
        check_attenuation(_child(parent, cnf_jkt=None, cnf_x5t=X5T), parent)


def test_an_unbound_parent_allows_a_bound_or_unbound_child() -> None:
    parent = _parent(cnf_jkt=None, cnf_x5t=None)
    check_attenuation(_child(parent), parent)
    check_attenuation(_child(parent, cnf_jkt=JKT), parent)


def test_the_first_widening_is_named() -> None:
    parent = _parent()
    error = _widens(_child(parent, key_id="key-2", operations=("sign",)), parent)
    assert "key" in error.message
    error = _widens(_child(parent, expires_at=NOW + 10**6), parent)
    assert "outlive" in error.message


def test_attenuation_violated_is_a_403_but_not_a_grant_denial() -> None:
    assert issubclass(AttenuationViolated, Forbidden)
    assert not issubclass(AttenuationViolated, GrantDenied)
    assert AttenuationViolated.status == 403
