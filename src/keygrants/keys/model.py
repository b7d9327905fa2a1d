"""Key metadata records, as the store keeps them."""

from __future__ import annotations

from typing import Final, Literal

import msgspec

__all__ = ["KEY_STATES", "MAX_NAME_LENGTH", "NAME_PATTERN", "Key", "KeyState", "KeyVersion"]

KeyState = Literal["enabled", "disabled", "pending_deletion", "destroyed"]
KEY_STATES: Final[tuple[KeyState, ...]] = ("enabled", "disabled", "pending_deletion", "destroyed")

MAX_NAME_LENGTH: Final = 128
NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class Key(msgspec.Struct, frozen=True, kw_only=True):
    """A key: its identity, spec, state and version bookkeeping.

    Times are Unix seconds; ``tags`` are free labels that policies match on.
    ``rotation_period`` is in seconds (``None``: rotate on demand
    only); ``next_rotation_at`` is when the scheduler rotates next; ``deletion_date`` and
    ``previous_state`` (restored by a cancel) are set while the key is pending deletion.
    """

    id: str
    name: str
    spec: str
    purpose: str
    description: str = ""
    state: KeyState = "enabled"
    derivable: bool = False
    created_at: int
    updated_at: int
    rotation_period: int | None = None
    next_rotation_at: int | None = None
    deletion_date: int | None = None
    previous_state: KeyState | None = None
    min_decryption_version: int = 1
    latest_version: int = 1
    tags: tuple[str, ...] = ()


class KeyVersion(msgspec.Struct, frozen=True, kw_only=True):
    """One version of a key: its sealed secret and, for signing keys, its public key."""

    key_id: str
    version: int
    created_at: int
    sealed: bytes
    public_key_der: bytes | None = None
