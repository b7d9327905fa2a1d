"""Recording audit events from the service and the edge.

The service calls :meth:`AuditRecorder.record` for every decision and operation. When the
request context carries a pending list (the HTTP edge sets one), the event's durability
future is added to it and the edge awaits it before answering, so a request never blocks the
event loop on an fsync and never gets an answer whose event is not durable. Otherwise (state
changes applied from a worker thread, the scheduler, in-process use) ``record`` blocks until
the event is durable. Either way a failure is :class:`~keygrants.errors.AuditUnavailable`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from keygrants.audit.events import Digester, Result
from keygrants.audit.log import AuditLog
from keygrants.auth import RequestContext

__all__ = ["AuditRecorder", "LogRecorder", "NoAudit"]


class AuditRecorder(Protocol):
    """Where the service sends its audit events."""

    def record(self, ctx: RequestContext, type: str, result: Result, *,
               operation: str | None = None, reason: str | None = None,
               key_id: str | None = None, key_version: int | None = None,
               grant_id: str | None = None, detail: Mapping[str, str] | None = None,
               wait: bool = False) -> None:
        """Record one event (``wait``: block until durable even if the context defers)."""

    def digest(self, value: str | bytes) -> str:
        """The keyed digest that stands for a sensitive value."""


class NoAudit:
    """Records nothing: for library use without a server, and for the no-op benchmark."""

    def record(self, ctx: RequestContext, type: str, result: Result, **kwargs: Any) -> None:
        return None

    def digest(self, value: str | bytes) -> str:
        return "hmac-sha256:" + "0" * 64


class LogRecorder:
    """Records into an :class:`~keygrants.audit.log.AuditLog`.

    Args:
        log: the durable log.
        digester: keyed digests for sensitive values.
        node: this server's node id, stamped on every event.
        timeout: how long to wait for durability before failing closed.
    """

    def __init__(self, log: AuditLog, digester: Digester, *, node: str,
                 timeout: float = 10.0) -> None:
        self.log = log
        self._digester = digester
        self.node = node
        self.timeout = timeout

    def record(self, ctx: RequestContext, type: str, result: Result, *,
               operation: str | None = None, reason: str | None = None,
               key_id: str | None = None, key_version: int | None = None,
               grant_id: str | None = None, detail: Mapping[str, str] | None = None,
               wait: bool = False) -> None:
        if grant_id is None and ctx.grant is not None:
            grant_id = ctx.grant.grant_id
        fields: dict[str, Any] = {
            "type": type, "result": result, "principal": ctx.principal or None,
            "credential": ctx.credential_id, "key_id": key_id, "key_version": key_version,
            "grant_id": grant_id, "operation": operation, "reason": reason,
            "request_id": ctx.request_id or None, "trace_id": ctx.trace_id,
            "source": ctx.source, "node": self.node,
        }
        if detail or ctx.attributes:
            fields["detail"] = {**ctx.attributes, **(detail or {})}
        if ctx.pending_audit is not None and not wait:
            ctx.pending_audit.append(self.log.submit(fields))
            return
        self.log.append(fields, timeout=self.timeout)

    def digest(self, value: str | bytes) -> str:
        return self._digester.digest(value)
