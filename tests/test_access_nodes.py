"""Two nodes' access services on one database: a principal disabled, or a credential
revoked, on one node is never undone by a stale write from the other, and usage times are
never written back (the store's compare-and-set, and the service's re-read and retry). Runs
against every store implementation."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from keygrants import models as m
from keygrants.access import Access, open_access
from keygrants.auth import RequestContext, ensure_admin_token
from keygrants.errors import Conflict
from keygrants.store.base import Store


@pytest.fixture
def nodes(store: Store, second_node: Store, clock: Any) -> tuple[Access, Access]:
    ensure_admin_token(store)
    root = os.urandom(32)
    return open_access(store, root, clock=clock), open_access(second_node, root, clock=clock)


@pytest.fixture
def interleave(interleaved: Callable[..., Store]) -> Callable[..., None]:
    """``interleave(node, method, act)``: the node's store lets ``act`` run before ``method``."""
    def go(access: Access, method: str, act: Callable[[], object], *, times: int = 1) -> None:
        access.service.store = interleaved(access.service.store, method, act, times=times)
    return go


def test_a_rename_does_not_re_enable_a_principal_disabled_on_another_node(
        store: Store, nodes: tuple[Access, Access], admin: RequestContext,
        interleave: Callable[..., None]) -> None:
    a, b = nodes
    a.service.create_principal(admin, m.CreatePrincipalRequest(id="svc", display_name="Svc"))
    interleave(b, "update_principal", lambda: a.service.disable_principal(admin, "svc"))
    info = b.service.update_principal(admin, "svc", m.UpdatePrincipalRequest(display_name="renamed"))
    assert (info.enabled, info.display_name) == (False, "renamed")
    stored = store.get_principal("svc")
    assert stored is not None and (stored.enabled, stored.display_name) == (False, "renamed")


def test_a_principal_change_never_writes_last_seen_back(
        store: Store, nodes: tuple[Access, Access], admin: RequestContext,
        interleave: Callable[..., None]) -> None:
    a, b = nodes
    a.service.create_principal(admin, m.CreatePrincipalRequest(id="svc"))
    interleave(b, "update_principal", lambda: store.record_usage({"svc": 2_000_000_000}, {}))
    b.service.update_principal(admin, "svc", m.UpdatePrincipalRequest(display_name="renamed"))
    stored = store.get_principal("svc")
    assert stored is not None and stored.last_seen_at == 2_000_000_000
    assert stored.display_name == "renamed"


def test_a_principal_that_keeps_changing_is_a_conflict(
        store: Store, nodes: tuple[Access, Access], admin: RequestContext,
        interleave: Callable[..., None]) -> None:
    a, b = nodes
    a.service.create_principal(admin, m.CreatePrincipalRequest(id="svc"))
    names = iter(["one", "two"])
    interleave(b, "update_principal",
               lambda: a.service.update_principal(
                   admin, "svc", m.UpdatePrincipalRequest(display_name=next(names))), times=2)
    with pytest.raises(Conflict):
        b.service.disable_principal(admin, "svc")
    stored = store.get_principal("svc")
    assert stored is not None and stored.enabled and stored.display_name == "two"


def test_a_revocation_keeps_usage_recorded_meanwhile(
        store: Store, nodes: tuple[Access, Access], admin: RequestContext, clock: Any,
        interleave: Callable[..., None]) -> None:
    a, b = nodes
    a.service.create_principal(admin, m.CreatePrincipalRequest(id="svc"))
    created = a.service.create_api_key(admin, "svc", m.CreateApiKeyRequest(label="ci"))
    cid = created.credential.id

    def meanwhile() -> None:  # node A sees the key used, then revokes it, a second later
        store.record_usage({}, {cid: 2_000_000_000})
        clock.advance(1)
        a.service.revoke_credential(admin, "svc", cid)

    interleave(b, "update_credential", meanwhile)
    info = b.service.revoke_credential(admin, "svc", cid)
    stored = store.get_credential(cid)
    assert stored is not None and stored.last_used_at == 2_000_000_000
    assert stored.revoked_at == int(clock.now)  # A's revocation stands, B's found it done
    assert info.revoked_at is not None
