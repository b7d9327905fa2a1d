"""The revocation view a token check consults: grant, parent, principal-wholesale and
key-wholesale revocations, retired vs revoked, pruning and the feed's sequence number.
Every time is passed in; nothing sleeps."""

from __future__ import annotations

import threading
from typing import Any

import msgspec
import pytest

from keygrants.errors import GrantDenied, GrantRetired, GrantRevoked
from keygrants.grants.model import GrantClaims
from keygrants.grants.revocation import REVOCATION_KINDS, RevocationEntry, RevocationView

NOW = 1_800_000_000
GRANT = "g_" + "a" * 26
PARENT = "g_" + "b" * 26
OTHER = "g_" + "c" * 26


def _claims(**changes: Any) -> GrantClaims:
    base = GrantClaims(grant_id=GRANT, issuer="https://kms", grantee="svc-a", audiences=("kms",),
                       issued_at=NOW - 10, not_before=NOW - 10, expires_at=NOW + 300,
                       key_id="key-1", operations=frozenset({"decrypt"}))
    return msgspec.structs.replace(base, **changes)


def _entry(kind: str, ident: str, *, revoked_at: int = NOW, expires_at: int = NOW + 330,
           reason: str = "revoked", seq: int = 1) -> RevocationEntry:
    return RevocationEntry(kind=kind, id=ident, revoked_at=revoked_at,  # type: ignore[arg-type]
                           expires_at=expires_at, reason=reason, seq=seq)


def _view(*entries: RevocationEntry) -> RevocationView:
    view = RevocationView()
    view.apply(entries)
    return view


def _denied(view: RevocationView, claims: GrantClaims, error: type[GrantDenied], code: str) -> None:
    with pytest.raises(GrantDenied) as info:
        view.check(claims)
    assert type(info.value) is error
    assert info.value.code == code


# -- entries -------------------------------------------------------------------------------------


def test_kinds_and_entry_defaults() -> None:
    assert frozenset({"grant", "principal", "key"}) == REVOCATION_KINDS
    entry = RevocationEntry(kind="grant", id=GRANT, revoked_at=NOW, expires_at=NOW + 1)
    assert (entry.reason, entry.seq) == ("revoked", 0)


def test_entries_round_trip_as_json_and_refuse_unknown_kinds() -> None:
    entry = _entry("principal", "svc-a", seq=7)
    assert msgspec.json.decode(msgspec.json.encode(entry), type=RevocationEntry) == entry
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"kind":"everything","id":"x","revoked_at":1,"expires_at":2}',
                            type=RevocationEntry)


# -- an empty view -------------------------------------------------------------------------------


def test_an_empty_view_lets_every_token_through() -> None:
    view = RevocationView()
    view.check(_claims())
    assert (len(view), view.seq) == (0, 0)
    assert view.prune(NOW + 10**9) == 0


# -- grants --------------------------------------------------------------------------------------


def test_a_revoked_grant_is_refused() -> None:
    view = _view(_entry("grant", GRANT))
    _denied(view, _claims(), GrantRevoked, "grant_revoked")
    view.check(_claims(grant_id=OTHER))


def test_a_retired_grant_is_refused_as_retired() -> None:
    view = _view(_entry("grant", GRANT, reason="retired"))
    _denied(view, _claims(), GrantRetired, "grant_retired")


@pytest.mark.parametrize("reason", ["revoked", "compromised", "", "RETIRED"])
def test_any_other_reason_reads_as_revoked(reason: str) -> None:
    _denied(_view(_entry("grant", GRANT, reason=reason)), _claims(), GrantRevoked, "grant_revoked")


def test_a_grant_revocation_covers_every_token_of_the_grant_whenever_issued() -> None:
    view = _view(_entry("grant", GRANT, revoked_at=NOW))
    for issued_at in (NOW - 1000, NOW, NOW + 1000):
        _denied(view, _claims(issued_at=issued_at), GrantRevoked, "grant_revoked")


def test_the_latest_applied_grant_entry_names_the_reason() -> None:
    view = _view(_entry("grant", GRANT, reason="retired", seq=1))
    view.apply([_entry("grant", GRANT, reason="revoked", seq=2)])
    _denied(view, _claims(), GrantRevoked, "grant_revoked")
    assert len(view) == 1


# -- parents -------------------------------------------------------------------------------------


def test_a_child_of_a_revoked_parent_is_refused() -> None:
    view = _view(_entry("grant", PARENT))
    _denied(view, _claims(parent_id=PARENT), GrantRevoked, "grant_revoked")
    view.check(_claims(parent_id=OTHER))
    view.check(_claims(parent_id=None))


def test_a_child_of_a_retired_parent_is_refused_as_revoked() -> None:
    view = _view(_entry("grant", PARENT, reason="retired"))
    _denied(view, _claims(parent_id=PARENT), GrantRevoked, "grant_revoked")


def test_the_grant_s_own_entry_names_the_reason_before_its_parent() -> None:
    view = _view(_entry("grant", GRANT, reason="retired"), _entry("grant", PARENT))
    _denied(view, _claims(parent_id=PARENT), GrantRetired, "grant_retired")


def test_a_parent_id_is_not_matched_against_principal_or_key_entries() -> None:
    view = _view(_entry("principal", PARENT), _entry("key", PARENT))
    view.check(_claims(parent_id=PARENT))


# -- principals and keys wholesale ---------------------------------------------------------------


@pytest.mark.parametrize(("kind", "field", "value"), [
    ("principal", "grantee", "svc-a"),
    ("key", "key_id", "key-1"),
])
def test_a_wholesale_revocation_covers_tokens_issued_up_to_it(kind: str, field: str, value: str) -> None:
    view = _view(_entry(kind, value, revoked_at=NOW))
    for issued_at in (NOW - 10**6, NOW - 1, NOW):
        _denied(view, _claims(**{field: value, "issued_at": issued_at}), GrantRevoked, "grant_revoked")
    for issued_at in (NOW + 1, NOW + 1000):
        view.check(_claims(**{field: value, "issued_at": issued_at}))
    view.check(_claims(**{field: value + "-other", "issued_at": NOW - 1}))


def test_principal_and_key_entries_do_not_cross() -> None:
    view = _view(_entry("principal", "key-1"), _entry("key", "svc-a"))
    view.check(_claims(grantee="svc-a", key_id="key-1"))


def test_a_grant_id_entry_does_not_match_a_principal_or_key_of_that_name() -> None:
    view = _view(_entry("grant", "svc-a"), _entry("grant", "key-1"))
    view.check(_claims(grantee="svc-a", key_id="key-1"))


@pytest.mark.parametrize("kind", ["principal", "key"])
def test_the_latest_wholesale_revocation_wins_in_any_order(kind: str) -> None:
    subject = "svc-a" if kind == "principal" else "key-1"
    field = "grantee" if kind == "principal" else "key_id"
    later = _entry(kind, subject, revoked_at=NOW + 100, expires_at=NOW + 500, seq=2)
    earlier = _entry(kind, subject, revoked_at=NOW, expires_at=NOW + 400, seq=1)
    for order in ([earlier, later], [later, earlier]):
        view = _view(*order)
        _denied(view, _claims(**{field: subject, "issued_at": NOW + 100}), GrantRevoked,
                "grant_revoked")
        view.check(_claims(**{field: subject, "issued_at": NOW + 101}))
        assert len(view) == 1
        assert view.seq == 2
        assert view.prune(NOW + 400) == 0  # the later expiry keeps it
        assert view.prune(NOW + 500) == 1


def test_a_wholesale_revocation_at_time_zero_still_covers_tokens_issued_at_zero() -> None:
    view = _view(_entry("principal", "svc-a", revoked_at=0))
    _denied(view, _claims(issued_at=0), GrantRevoked, "grant_revoked")
    view.check(_claims(issued_at=1))


# -- prune ---------------------------------------------------------------------------------------


def test_prune_drops_expired_entries_only() -> None:
    view = _view(
        _entry("grant", GRANT, expires_at=NOW + 100),
        _entry("grant", OTHER, expires_at=NOW + 200),
        _entry("principal", "svc-a", expires_at=NOW + 100),
        _entry("key", "key-1", expires_at=NOW + 300),
    )
    assert len(view) == 4
    assert view.prune(NOW + 99) == 0
    assert len(view) == 4
    assert view.prune(NOW + 100) == 2  # expiry is exclusive: every token it covers has expired
    assert len(view) == 2
    view.check(_claims(grant_id=GRANT, grantee="svc-a", key_id="key-x"))
    _denied(view, _claims(grant_id=OTHER, key_id="key-x"), GrantRevoked, "grant_revoked")
    _denied(view, _claims(grant_id=GRANT, key_id="key-1"), GrantRevoked, "grant_revoked")
    assert view.prune(NOW + 100) == 0
    assert view.prune(NOW + 10**6) == 2
    assert len(view) == 0
    view.check(_claims(grant_id=OTHER, key_id="key-1"))


def test_prune_keeps_the_seq() -> None:
    view = _view(_entry("grant", GRANT, expires_at=NOW, seq=9))
    assert view.prune(NOW) == 1
    assert view.seq == 9


def test_a_grant_entry_and_a_principal_entry_with_one_id_are_pruned_apart() -> None:
    view = _view(_entry("grant", "x", expires_at=NOW + 10), _entry("principal", "x", expires_at=NOW + 20))
    assert len(view) == 2
    assert view.prune(NOW + 10) == 1
    _denied(view, _claims(grantee="x", issued_at=NOW - 1), GrantRevoked, "grant_revoked")


def test_a_grant_entry_keeps_the_latest_expiry_of_its_entries() -> None:
    view = _view(_entry("grant", GRANT, expires_at=NOW + 500), _entry("grant", GRANT, expires_at=NOW + 100))
    assert view.prune(NOW + 100) == 0
    _denied(view, _claims(), GrantRevoked, "grant_revoked")
    assert view.prune(NOW + 500) == 1


# -- seq -----------------------------------------------------------------------------------------


def test_seq_tracks_the_highest_entry_applied() -> None:
    view = RevocationView()
    view.apply([_entry("grant", GRANT, seq=3), _entry("grant", OTHER, seq=1)])
    assert view.seq == 3
    view.apply([_entry("principal", "svc-a", seq=2)])
    assert view.seq == 3  # only forward
    view.apply([_entry("key", "key-1", seq=10)])
    assert view.seq == 10
    view.apply([])
    assert view.seq == 10


def test_apply_takes_any_iterable() -> None:
    view = RevocationView()
    view.apply(_entry("grant", ident, seq=seq) for seq, ident in enumerate((GRANT, OTHER), start=1))
    assert view.seq == 2
    assert len(view) == 2
    _denied(view, _claims(grant_id=OTHER), GrantRevoked, "grant_revoked")


# -- threads -------------------------------------------------------------------------------------


def test_apply_from_many_threads() -> None:
    view = RevocationView()
    threads_count, per_thread = 8, 250
    barrier = threading.Barrier(threads_count)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            seq = t * per_thread + i + 1
            view.apply([_entry("grant", f"g-{t}-{i}", seq=seq),
                        _entry("principal", f"p-{t}", revoked_at=NOW + i, seq=seq)])
            view.check(_claims(grant_id=f"g-{t}-{i}-x", grantee="nobody"))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(view) == threads_count * per_thread + threads_count
    assert view.seq == threads_count * per_thread
    for t in range(threads_count):
        _denied(view, _claims(grant_id=f"g-{t}-{per_thread - 1}"), GrantRevoked, "grant_revoked")
        _denied(view, _claims(grantee=f"p-{t}", issued_at=NOW + per_thread - 1), GrantRevoked,
                "grant_revoked")
        view.check(_claims(grantee=f"p-{t}", issued_at=NOW + per_thread))


def test_prune_and_apply_from_threads_leave_a_consistent_view() -> None:
    view = RevocationView()
    view.apply([_entry("grant", f"old-{i}", expires_at=NOW, seq=i + 1) for i in range(500)])
    barrier = threading.Barrier(2)
    pruned: list[int] = []

    def prune() -> None:
        barrier.wait()
        for _ in range(50):
            pruned.append(view.prune(NOW))

    def apply() -> None:
        barrier.wait()
        for i in range(500):
            view.apply([_entry("grant", f"new-{i}", expires_at=NOW + 1, seq=1000 + i)])

    threads = [threading.Thread(target=prune), threading.Thread(target=apply)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(pruned) == 500
    assert len(view) == 500
    assert view.seq == 1499
    _denied(view, _claims(grant_id="new-499"), GrantRevoked, "grant_revoked")
    view.check(_claims(grant_id="old-0"))
