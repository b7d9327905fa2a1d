"""The verifier's revocation view against a feed it does not control: entries the KMS drops
with a shorter leeway than the verifier's, and a feed whose numbering goes back."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from keygrants import errors
from keygrants.client.verifier import AsyncVerifier, Verifier
from keygrants.grants.model import GrantClaims

from .conftest import FakeKMS

pytestmark = pytest.mark.anyio


async def after_pull(v: AsyncVerifier, token: str) -> GrantClaims:
    """verify() once the fetches due at the clock's time have ended: a first call starts them
    in the background (answering from the view held), the second sees what they brought."""
    with contextlib.suppress(errors.GrantDenied):
        await v.verify(token)
    tasks = [task for task in (v._keys.running(), v._feed.running()) if task is not None]
    if tasks:
        await asyncio.wait(tasks)
    return await v.verify(token)


def after_pull_sync(v: Verifier, token: str) -> GrantClaims:
    """:func:`after_pull` for the sync verifier (its fetches run in threads)."""
    with contextlib.suppress(errors.GrantDenied):
        v.verify(token)
    for ended in (v._keys.running(), v._feed.running()):
        if ended is not None:
            assert ended.wait(10), "a fetch never ended"
    return v.verify(token)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("leeway", [120, 300])
async def test_a_revoked_token_stays_revoked_while_the_verifier_accepts_its_window(
        leeway: int) -> None:
    clock = Clock()
    kms = FakeKMS(clock, leeway=30)  # the KMS's entry expires at exp + 30
    grant, token = kms.mint(ttl=300)
    v = AsyncVerifier("http://kms", audience="svc", leeway=leeway, poll_interval=1,
                      clock=clock, transport=kms.transport())
    assert (await v.verify(token)).grant_id == grant.id
    kms.revoke(grant)
    clock.now += 1
    with pytest.raises(errors.GrantRevoked):
        await after_pull(v, token)
    # past the KMS's expires_at (it no longer serves the entry), pulled every second, up to
    # the last second the verifier's own leeway accepts the token: still revoked
    for now in range(grant.expires_at + 31, grant.expires_at + leeway, 7):
        clock.now = now
        with pytest.raises(errors.GrantRevoked):
            await after_pull(v, token)
    clock.now = grant.expires_at + leeway - 1
    with pytest.raises(errors.GrantRevoked):
        await after_pull(v, token)
    clock.now = grant.expires_at + leeway
    with pytest.raises(errors.GrantExpired):
        await after_pull(v, token)
    await v.aclose()


def test_the_sync_verifier_keeps_entries_for_its_own_leeway() -> None:
    clock = Clock()
    kms = FakeKMS(clock, leeway=30)
    grant, token = kms.mint(ttl=60)
    with Verifier("http://kms", audience="svc", leeway=120, poll_interval=1, clock=clock,
                  transport=kms.transport()) as v:
        v.verify(token)
        kms.revoke(grant)
        clock.now += 1
        with pytest.raises(errors.GrantRevoked):
            after_pull_sync(v, token)
        clock.now = grant.expires_at + 31  # the KMS no longer serves the entry
        with pytest.raises(errors.GrantRevoked):
            after_pull_sync(v, token)


def test_a_feed_numbered_from_lower_again_is_pulled_from_the_start(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    kms = FakeKMS(clock)
    old = [kms.mint() for _ in range(50)]
    for grant, _ in old:
        kms.revoke(grant)
    _, token = kms.mint()
    with Verifier("http://kms", audience="svc", poll_interval=1, clock=clock,
                  transport=kms.transport()) as v:
        v.verify(token)  # has seen seq 50
        # the KMS's store is restored from a backup taken at seq 10, then a grant is revoked
        kms.entries, kms.latest = kms.entries[:10], 10
        grant, revoked = kms.mint()
        v.verify(revoked)
        kms.revoke(grant)  # seq 11
        clock.now += 1
        with caplog.at_level(logging.WARNING, logger="keygrants.verifier"), \
                pytest.raises(errors.GrantRevoked):
            after_pull_sync(v, revoked)
        assert "went back from seq 50 to 11" in caplog.text
        with pytest.raises(errors.GrantRevoked):  # what it held from before is kept
            v.verify(old[30][1])
        # from then on it asks for what follows seq 11
        kms.requests.clear()
        clock.now += 1
        after_pull_sync(v, token)
        assert [r.rsplit("since=", 1)[-1] for r in kms.requests] == ["11"]


def test_a_heartbeat_behind_what_was_seen_makes_the_verifier_pull() -> None:
    from keygrants.client.verifier import _Pushed
    from keygrants.grants.push import heartbeat_message

    clock = Clock()
    with Verifier("http://kms", clock=clock, transport=FakeKMS(clock).transport()) as v:
        state = v._state
        state.feed_seq = 50
        assert _Pushed.handle(state, heartbeat_message(50, clock())) is None  # nothing new
        assert _Pushed.handle(state, heartbeat_message(10, clock())) is not None  # went back
        assert _Pushed.handle(state, heartbeat_message(51, clock())) is not None


def test_a_verifier_whose_newest_entries_expired_stops_asking_for_them() -> None:
    """Once the KMS has dropped the newest entries, a verifier used to stay behind the feed's
    number and pull on every heartbeat (once a second, for good); ``next_since`` moves it past
    them."""
    from keygrants.client.verifier import _Pushed
    from keygrants.grants.push import heartbeat_message

    clock = Clock()
    kms = FakeKMS(clock)
    grant, token = kms.mint(ttl=60)
    kms.revoke(grant)
    with Verifier("http://kms", clock=clock, transport=kms.transport(), audience="svc") as v:
        with pytest.raises(errors.GrantRevoked):
            v.verify(token)
        state = v._state
        assert state.feed_seq == 1
        for _ in range(3):
            kms.revoke(kms.mint(ttl=1)[0])  # entries 2..4: expired before the next pull
        clock.now += 200
        assert _Pushed.handle(state, heartbeat_message(kms.latest, clock())) is not None
        kms.next_since = True
        v.pull_revocations()
        assert state.feed_seq == kms.latest == 4
        assert _Pushed.handle(state, heartbeat_message(kms.latest, clock())) is None
