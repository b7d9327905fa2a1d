"""Two KMS nodes on one database: a key change made on one node is never undone, nor a
cancelled deletion carried out, by the other (the store's compare-and-set, and the service's
re-read and retry). Runs against every store implementation."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from keygrants import models as m
from keygrants.auth import RequestContext
from keygrants.errors import Conflict
from keygrants.service import KMS
from keygrants.store.base import Store


@pytest.fixture
def root() -> bytes:
    return os.urandom(32)


def node(store: Store, root: bytes, clock: Any) -> KMS:
    return KMS(store, root, clock=clock)


def test_rotation_does_not_undo_a_disable_made_on_another_node(
        store: Store, second_node: Store, root: bytes, clock: Any,
        admin: RequestContext, interleaved: Callable[..., Store]) -> None:
    b = node(second_node, root, clock)
    a = node(interleaved(store, "add_version", lambda: b.disable_key(admin, "k")), root, clock)
    a.create_key(admin, m.CreateKeyRequest(name="k"))
    info = a.rotate_key(admin, "k")  # B disables between A's read and A's write
    assert (info.state, info.latest_version) == ("disabled", 2)
    stored = store.get_key(info.id)
    assert stored is not None and (stored.state, stored.latest_version) == ("disabled", 2)


def test_scheduled_rotation_does_not_undo_a_disable_made_on_another_node(
        store: Store, second_node: Store, root: bytes, clock: Any,
        admin: RequestContext, interleaved: Callable[..., Store]) -> None:
    b = node(second_node, root, clock)
    a = node(interleaved(store, "add_version", lambda: b.disable_key(admin, "k")), root, clock)
    info = a.create_key(admin, m.CreateKeyRequest(name="k", rotation_period=3600))
    clock.advance(3600)
    assert a.run_due() == (0, 0)  # disabled meanwhile: no longer due
    stored = store.get_key(info.id)
    assert stored is not None and (stored.state, stored.latest_version) == ("disabled", 1)


def test_a_deletion_cancelled_on_another_node_is_not_carried_out(
        store: Store, second_node: Store, root: bytes, clock: Any,
        admin: RequestContext, interleaved: Callable[..., Store]) -> None:
    a = node(store, root, clock)
    scheduler = node(interleaved(second_node, "destroy_key", lambda: a.cancel_deletion(admin, "k")),
                     root, clock)
    info = a.create_key(admin, m.CreateKeyRequest(name="k"))
    sealed = a.encrypt(admin, "k", b"data").ciphertext
    a.schedule_deletion(admin, "k", 7)
    clock.advance(8 * 86400)
    assert scheduler.run_due() == (0, 0)  # A cancels between B's read and B's destroy
    stored = store.get_key(info.id)
    assert stored is not None and stored.state == "enabled"
    assert all(v.sealed for v in store.get_versions(info.id))
    assert node(store, root, clock).decrypt(admin, sealed).plaintext == b"data"


def test_the_scheduler_still_destroys_a_key_that_is_due(
        store: Store, root: bytes, clock: Any, admin: RequestContext) -> None:
    a = node(store, root, clock)
    info = a.create_key(admin, m.CreateKeyRequest(name="k"))
    a.schedule_deletion(admin, "k", 7)
    clock.advance(8 * 86400)
    assert a.run_due() == (0, 1)
    stored = store.get_key(info.id)
    assert stored is not None and stored.state == "destroyed"
    assert [v.sealed for v in store.get_versions(info.id)] == [b""]


def test_two_changes_in_one_second_on_two_nodes_are_both_kept(
        store: Store, second_node: Store, root: bytes, clock: Any,
        admin: RequestContext, interleaved: Callable[..., Store]) -> None:
    a = node(store, root, clock)
    b = node(interleaved(second_node, "update_key", lambda: a.disable_key(admin, "k")), root, clock)
    a.create_key(admin, m.CreateKeyRequest(name="k"))
    # the clock does not move: both changes fall in the same second
    info = b.update_key(admin, "k", m.UpdateKeyRequest(description="new"))
    assert (info.state, info.description) == ("disabled", "new")
    stored = store.get_key(info.id)
    assert stored is not None and (stored.state, stored.description) == ("disabled", "new")


def test_a_key_that_keeps_changing_is_a_conflict_not_an_overwrite(
        store: Store, second_node: Store, root: bytes, clock: Any,
        admin: RequestContext, interleaved: Callable[..., Store]) -> None:
    a = node(store, root, clock)
    flips = iter(["one", "two", "three"])
    b = node(interleaved(second_node, "update_key",
                        lambda: a.update_key(admin, "k", m.UpdateKeyRequest(description=next(flips))),
                        times=2), root, clock)
    a.create_key(admin, m.CreateKeyRequest(name="k"))
    with pytest.raises(Conflict):
        b.disable_key(admin, "k")
    stored = store.find_key("k")
    assert stored is not None and (stored.state, stored.description) == ("enabled", "two")
