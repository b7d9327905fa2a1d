"""Key specs: what kind of key, for which purpose, with which operations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "DEFAULT_SPEC",
    "OPERATIONS",
    "PURPOSES",
    "SPECS",
    "KeySpec",
    "Operation",
    "Purpose",
    "get_spec",
]

Purpose = Literal["encrypt-decrypt", "sign-verify", "mac"]
Operation = Literal[
    "encrypt", "decrypt", "re_encrypt", "generate_data_key", "sign", "verify",
    "get_public_key", "mac", "verify_mac", "derive",
]

PURPOSES: Final[tuple[Purpose, ...]] = ("encrypt-decrypt", "sign-verify", "mac")

OPERATIONS: Final[dict[Purpose, frozenset[str]]] = {
    "encrypt-decrypt": frozenset({"encrypt", "decrypt", "re_encrypt", "generate_data_key"}),
    "sign-verify": frozenset({"sign", "verify", "get_public_key"}),
    "mac": frozenset({"mac", "verify_mac"}),
}


@dataclass(frozen=True, slots=True)
class KeySpec:
    """A supported kind of key.

    Attributes:
        name: the wire name, e.g. ``"aes-256-gcm"``.
        purpose: what the key is for.
        algorithm: the crypto-layer algorithm name.
        symmetric: whether the material is a secret byte string (derivable keys must be).
    """

    name: str
    purpose: Purpose
    algorithm: str
    symmetric: bool

    @property
    def operations(self) -> frozenset[str]:
        """Operations this spec allows (``derive`` is added for derivable keys)."""
        return OPERATIONS[self.purpose]


SPECS: Final[dict[str, KeySpec]] = {
    s.name: s
    for s in (
        KeySpec("aes-256-gcm", "encrypt-decrypt", "aes-256-gcm", True),
        KeySpec("chacha20-poly1305", "encrypt-decrypt", "chacha20-poly1305", True),
        KeySpec("hmac-sha256", "mac", "hmac-sha256", True),
        KeySpec("ed25519", "sign-verify", "ed25519", False),
        KeySpec("ecdsa-p256", "sign-verify", "ecdsa-p256-sha256", False),
        KeySpec("rsa-pss-3072", "sign-verify", "rsa-pss-3072-sha256", False),
    )
}

DEFAULT_SPEC: Final = "aes-256-gcm"


def get_spec(name: str) -> KeySpec:
    """Look up a spec by name.

    Raises:
        ValueError: for an unknown spec name (the message lists the known ones).
    """
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown key spec {name!r}; expected one of {', '.join(SPECS)}") from None
