"""Models of the application-side KMS (providers and :class:`~keygrants.KeyManager`).

Shaped after the FraiseQL KMS models so that its users feel at home: a
:class:`KeyReference` names a key at a provider, :class:`EncryptedData` is a ciphertext with
everything needed to decrypt it again (and serializes with ``to_dict``/``from_dict``),
:class:`DataKeyPair` is a data key in clear plus its wrapped form, and
:class:`RotationPolicy` describes how a key rotates.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["DataKeyPair", "EncryptedData", "KeyReference", "RotationPolicy"]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class KeyReference:
    """A key at a provider: ``provider`` is the provider's registered name, ``key_id`` its own
    identifier (an ARN, a Transit key name, a PKCS#11 label, ...)."""

    provider: str
    key_id: str
    key_alias: str | None = None
    purpose: str = "encrypt_decrypt"
    created_at: datetime = field(default_factory=_now)

    @property
    def qualified_id(self) -> str:
        """``provider:key_id``."""
        return f"{self.provider}:{self.key_id}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {"provider": self.provider, "key_id": self.key_id, "key_alias": self.key_alias,
                "purpose": self.purpose, "created_at": self.created_at.isoformat()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeyReference:
        """Inverse of :meth:`to_dict`."""
        return cls(provider=str(data["provider"]), key_id=str(data["key_id"]),
                   key_alias=data.get("key_alias"), purpose=str(data.get("purpose", "encrypt_decrypt")),
                   created_at=datetime.fromisoformat(data["created_at"]))


@dataclass(frozen=True, slots=True)
class EncryptedData:
    """A ciphertext and what is needed to decrypt it: the key, the algorithm, the context."""

    ciphertext: bytes
    key_reference: KeyReference
    algorithm: str
    encrypted_at: datetime = field(default_factory=_now)
    context: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (ciphertext as standard base64)."""
        return {"ciphertext": base64.b64encode(self.ciphertext).decode("ascii"),
                "key_reference": self.key_reference.to_dict(), "algorithm": self.algorithm,
                "encrypted_at": self.encrypted_at.isoformat(), "context": dict(self.context)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncryptedData:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: when a field is missing or malformed.
        """
        try:
            return cls(ciphertext=base64.b64decode(data["ciphertext"], validate=True),
                       key_reference=KeyReference.from_dict(data["key_reference"]),
                       algorithm=str(data["algorithm"]),
                       encrypted_at=datetime.fromisoformat(data["encrypted_at"]),
                       context={str(k): str(v) for k, v in dict(data.get("context") or {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an EncryptedData dict: {exc}") from None


@dataclass(frozen=True, slots=True)
class DataKeyPair:
    """A data key in clear (keep it in memory only) and wrapped by the provider."""

    plaintext_key: bytes = field(repr=False)
    encrypted_key: EncryptedData
    key_reference: KeyReference


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    """How a key rotates."""

    enabled: bool
    rotation_period_days: int | None = None
    last_rotation: datetime | None = None
    next_rotation: datetime | None = None
