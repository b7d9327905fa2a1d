"""Pushed revocation messages: what a subscriber makes of a message, including junk (anyone who
can publish on the bus can send one)."""

from __future__ import annotations

import pytest

from keygrants.grants.push import decode_message, entry_message, heartbeat_message
from keygrants.grants.revocation import RevocationEntry


def test_entries_and_heartbeats_round_trip() -> None:
    entry = RevocationEntry(seq=7, kind="grant", id="g_" + "a" * 26, revoked_at=10, expires_at=20)
    assert decode_message(entry_message(entry)) == entry
    assert decode_message(heartbeat_message(42, 1_800_000_000.5)) == 42


@pytest.mark.parametrize("message", [
    b"[" * 2000 + b"]" * 2000,
    b'{"type":"heartbeat","x":' + b"[" * 1900 + b"]" * 1900 + b"}",
], ids=["array", "member"])
def test_a_message_nested_too_deeply_is_junk_not_an_error(message: bytes) -> None:
    """Under the size limit, yet deep enough to exhaust the JSON parser's recursion: a
    ValueError (ignored by subscribers), never a RecursionError logged with its traceback."""
    assert len(message) <= 4096
    with pytest.raises(ValueError, match="nested too deeply"):
        decode_message(message)


def test_the_verifier_ignores_a_deeply_nested_message() -> None:
    from keygrants.client.verifier import Verifier, _Pushed

    with Verifier("http://kms") as v:
        assert _Pushed.handle(v._state, b"[" * 2000 + b"]" * 2000) is None
