"""The tamper-evident audit log: events, the Merkle log, signed checkpoints, verification."""

from __future__ import annotations

from keygrants.audit.events import AuditEvent, Digester, canonical_bytes
from keygrants.audit.log import AuditLog, EventQuery
from keygrants.audit.recorder import AuditRecorder, LogRecorder, NoAudit
from keygrants.audit.verify import VerifyReport, export_lines, verify_database, verify_export

__all__ = [
    "AuditEvent",
    "AuditLog",
    "AuditRecorder",
    "Digester",
    "EventQuery",
    "LogRecorder",
    "NoAudit",
    "VerifyReport",
    "canonical_bytes",
    "export_lines",
    "verify_database",
    "verify_export",
]
