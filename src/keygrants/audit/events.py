"""Audit events: one flat record per security-relevant happening, in canonical JSON.

An event is a leaf of the audit Merkle log; its bytes are RFC 8785 canonical JSON of the
fields below (keys sorted, no whitespace). Values are strings, integers, booleans or null,
and ``detail`` is a flat string map with ASCII keys, so msgspec's sorted encoding *is* the RFC
8785 form (a test cross-checks it against the reference implementation).

Secrets never appear: tokens, proofs, API keys and anything derived from plaintext are
recorded only as ``hmac-sha256:<hex>`` digests under the sealed audit HMAC key (see
:class:`Digester`), so an investigator holding a leaked token can find its uses
(``keygrants audit hash``) without the log revealing it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import UTC, datetime
from typing import Final, Literal

import msgspec

__all__ = [
    "DIGEST_PREFIX",
    "AuditEvent",
    "Digester",
    "Result",
    "canonical_bytes",
    "decode_event",
    "event_bytes",
    "format_time",
]

Result = Literal["ok", "requested", "denied", "error"]
DIGEST_PREFIX: Final = "hmac-sha256:"
_DETAIL_KEY: Final = re.compile(r"^[a-z0-9_]{1,64}$")
MAX_DETAIL_ENTRIES: Final = 16
MAX_DETAIL_VALUE: Final = 512


class AuditEvent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One audit record.

    Attributes:
        seq: the leaf index in the Merkle log (0-based, gapless).
        time: UTC, RFC 3339 with microseconds (``2026-11-22T03:20:00.123456Z``).
        type: dotted event type, e.g. ``crypto.encrypt``, ``key.rotate``, ``auth.failure``.
        result: ``ok``, ``requested`` (a state change about to be applied), ``denied`` or
            ``error``.
        principal: who (``None`` when authentication failed).
        credential: which of the principal's credentials.
        key_id, key_version: the key involved, if any.
        grant_id: the grant involved, if any.
        operation: the operation name (``encrypt``, ``create_key``, ...).
        reason: the error code when ``result`` is not ``ok``.
        request_id, trace_id: correlation with responses and traces.
        source: the client address.
        node: the server node that wrote the event.
        detail: small extra facts (digests, settings), string to string.
    """

    seq: int
    time: str
    type: str
    result: Result
    principal: str | None = None
    credential: str | None = None
    key_id: str | None = None
    key_version: int | None = None
    grant_id: str | None = None
    operation: str | None = None
    reason: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    source: str | None = None
    node: str | None = None
    detail: dict[str, str] = {}

    def __post_init__(self) -> None:
        if len(self.detail) > MAX_DETAIL_ENTRIES:
            raise ValueError("too many detail entries")
        for k, v in self.detail.items():
            if not _DETAIL_KEY.match(k) or len(v) > MAX_DETAIL_VALUE:
                raise ValueError(f"invalid detail entry {k!r}")


_encoder: Final = msgspec.json.Encoder(order="sorted")
_decoder: Final = msgspec.json.Decoder(AuditEvent)


def canonical_bytes(event: AuditEvent) -> bytes:
    """The event's RFC 8785 canonical JSON (the Merkle leaf data)."""
    return _encoder.encode(event)


_FIELDS: Final = tuple(f for f in AuditEvent.__struct_fields__ if f != "seq")
_FIELD_SET: Final = frozenset(_FIELDS)
_RESULTS: Final = frozenset({"ok", "requested", "denied", "error"})


def event_bytes(seq: int, fields: dict[str, object]) -> bytes:
    """Canonical bytes of the event ``fields`` at ``seq``, without building an
    :class:`AuditEvent` (the writer's hot path); the output equals
    ``canonical_bytes(AuditEvent(seq=seq, **fields))`` (a test pins that).

    Raises:
        ValueError: for a missing or unknown field, a bad result or a bad detail entry.
    """
    if not _FIELD_SET.issuperset(fields):
        raise ValueError(f"unknown event fields: {sorted(fields.keys() - _FIELD_SET)}")
    if not (isinstance(fields.get("time"), str) and isinstance(fields.get("type"), str)
            and fields.get("result") in _RESULTS):
        raise ValueError("an event needs a string time and type and a valid result")
    detail = fields.get("detail") or {}
    if detail and (not isinstance(detail, dict) or len(detail) > MAX_DETAIL_ENTRIES or any(
            not isinstance(k, str) or not _DETAIL_KEY.match(k) or not isinstance(v, str)
            or len(v) > MAX_DETAIL_VALUE for k, v in detail.items())):
        raise ValueError("invalid detail entries")
    record: dict[str, object] = dict.fromkeys(_FIELDS)
    record.update(fields)
    record["detail"] = detail
    record["seq"] = seq
    return _encoder.encode(record)


def decode_event(data: bytes) -> AuditEvent:
    """Parse an event's JSON.

    Raises:
        ValueError: if it is not a well-formed event.
    """
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"not an audit event: {exc}") from None


# (whole second, its formatted prefix), replaced as one tuple so threads never see a mix
_second: tuple[int, str] = (-1, "")


def format_time(ts: float) -> str:
    """RFC 3339 UTC with microseconds (``2026-11-22T03:20:00.123456Z``).

    Called for every audit event, so the date part is formatted once per second.
    """
    whole = int(ts)
    micros = round((ts - whole) * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    global _second
    cached = _second
    if cached[0] != whole:
        cached = _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{micros:06d}Z"


class Digester:
    """Keyed digests of sensitive values: ``hmac-sha256:<hex>`` under the audit HMAC key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the audit HMAC key must be at least 32 bytes")
        self._key = key

    def digest(self, value: str | bytes) -> str:
        """The digest recorded in place of ``value``."""
        data = value.encode("utf-8") if isinstance(value, str) else value
        return DIGEST_PREFIX + hmac.new(self._key, data, hashlib.sha256).hexdigest()
