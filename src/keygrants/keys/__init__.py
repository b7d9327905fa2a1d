"""Keys: specs, versions, the native ciphertext format, sealing and the in-memory keyring."""

from __future__ import annotations

from keygrants.keys.ciphertext import HEADER_SIZE, Ciphertext
from keygrants.keys.context import canonical_context
from keygrants.keys.keyring import Keyring, KeyVersions
from keygrants.keys.material import KeyMaterial, generate_material
from keygrants.keys.model import Key, KeyState, KeyVersion
from keygrants.keys.sealing import seal_key_version, unseal_key_version
from keygrants.keys.specs import DEFAULT_SPEC, SPECS, KeySpec, get_spec

__all__ = [
    "DEFAULT_SPEC",
    "HEADER_SIZE",
    "SPECS",
    "Ciphertext",
    "Key",
    "KeyMaterial",
    "KeySpec",
    "KeyState",
    "KeyVersion",
    "KeyVersions",
    "Keyring",
    "canonical_context",
    "generate_material",
    "get_spec",
    "seal_key_version",
    "unseal_key_version",
]
