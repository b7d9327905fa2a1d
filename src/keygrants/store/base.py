"""The store port: durable persistence of keys, versions, aliases and server metadata.

Every method that writes returns only after the write is durable. Implementations raise
:class:`~keygrants.errors.AlreadyExists` for a taken name or alias,
:class:`~keygrants.errors.Conflict` when a compare-and-set loses a race, and
:class:`~keygrants.errors.StoreError` when the backend fails; they never raise their driver's
exceptions to the caller.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from keygrants.keys.model import Key, KeyVersion

__all__ = ["Alias", "Store"]


class Alias(tuple[str, str]):
    """``(alias, key_id)``."""

    __slots__ = ()

    @property
    def alias(self) -> str:
        """The alias name."""
        return self[0]

    @property
    def key_id(self) -> str:
        """The key it points to."""
        return self[1]


@runtime_checkable
class Store(Protocol):
    """Durable storage for the KMS core."""

    # -- metadata --------------------------------------------------------------------------
    def get_meta(self, name: str) -> bytes | None:
        """A server metadata value (sealed root key, admin token hash, ...)."""

    def set_meta_if_absent(self, name: str, value: bytes) -> bool:
        """Set a metadata value unless present; return whether this call set it."""

    def set_meta(self, name: str, value: bytes) -> None:
        """Set a metadata value."""

    # -- keys ------------------------------------------------------------------------------
    def create_key(self, key: Key, first_version: KeyVersion) -> None:
        """Insert a new key with its first version, atomically.

        Raises:
            AlreadyExists: if the name is taken by a key or an alias.
        """

    def get_key(self, key_id: str) -> Key | None:
        """A key by id."""

    def find_key(self, name: str) -> Key | None:
        """A key by name or alias."""

    def list_keys(self, *, limit: int, after: str | None = None) -> list[Key]:
        """Keys ordered by name, those after ``after``."""

    def update_key(self, key: Key, *, expected_updated_at: int | None = None) -> None:
        """Replace a key's metadata (same id); optionally compare-and-set on updated_at.

        Raises:
            KeyNotFound: if the key does not exist.
            Conflict: if ``expected_updated_at`` does not match.
        """

    def add_version(self, key: Key, version: KeyVersion) -> None:
        """Insert a new version and update the key to it, atomically.

        The key's ``latest_version`` must equal ``version.version`` and the stored one must be
        ``version.version - 1``; otherwise another writer rotated first.

        Raises:
            Conflict: when another rotation won.
        """

    def get_versions(self, key_id: str) -> list[KeyVersion]:
        """All stored versions of a key, oldest first."""

    def destroy_key(self, key: Key) -> None:
        """Delete every version's sealed material and save the key (state ``destroyed``)."""

    def keys_due(self, now: int) -> list[Key]:
        """Keys whose rotation or deletion time has come."""

    # -- aliases ---------------------------------------------------------------------------
    def create_alias(self, alias: str, key_id: str) -> None:
        """Point a new alias at a key.

        Raises:
            AlreadyExists: if the alias is taken by a key name or another alias.
            KeyNotFound: if the key does not exist.
        """

    def delete_alias(self, alias: str) -> None:
        """Remove an alias.

        Raises:
            AliasNotFound: if there is no such alias.
        """

    def list_aliases(self, key_id: str | None = None) -> list[Alias]:
        """Aliases, optionally of one key, ordered by alias."""

    def close(self) -> None:
        """Release the backend."""
