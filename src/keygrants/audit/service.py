"""Audit use cases behind the API and CLI: checkpoints, proofs, search, export, digests.

Reads of the audit log are themselves audited, under the types docs/audit.md lists:
``audit.export``, ``audit.hash``, ``audit.checkpoint`` (reading the latest checkpoint or making
one) and ``audit.read`` (search, proofs, the verifier key); a policy refusal is ``denied``.
"""

from __future__ import annotations

from collections.abc import Iterator

from keygrants import models as m
from keygrants.audit.events import decode_event
from keygrants.audit.log import EventQuery
from keygrants.audit.note import Checkpoint, open_note, parse_vkey
from keygrants.audit.setup import AuditSetup
from keygrants.audit.verify import export_lines
from keygrants.auth import RequestContext
from keygrants.errors import Forbidden, InvalidRequest, NotFound

__all__ = ["AuditService"]

MAX_HASH_INPUT = 8192

# the event types of audit-log reads (docs/audit.md, "What is recorded")
_READ = "audit.read"
_EXPORT = "audit.export"
_CHECKPOINT = "audit.checkpoint"
_HASH = "audit.hash"


class AuditService:
    """Authorized access to the audit log.

    Args:
        setup: the opened log and its keys.
        authorizer: the same policy decision point as the KMS (``read_audit``, ``checkpoint_audit``).
    """

    def __init__(self, setup: AuditSetup, authorizer: object) -> None:
        self.setup = setup
        self._authorizer = authorizer
        self._verifier = parse_vkey(setup.vkey)

    def _allow(self, ctx: RequestContext, action: str, event_type: str) -> None:
        """Authorize ``action`` and record the read as ``event_type``: ``ok``, or ``denied``
        when the policy refuses it (with the refusing statements, as for any use case)."""
        try:
            self._authorizer.authorize(ctx, action, None)  # type: ignore[attr-defined]
        except Forbidden as exc:
            self.setup.recorder.record(ctx, event_type, "denied", operation=action,
                                       reason=exc.code)
            raise
        self.setup.recorder.record(ctx, event_type, "ok", operation=action)

    def _checkpoint(self, note: bytes) -> m.AuditCheckpoint:
        cp = Checkpoint.parse(open_note(note, [self._verifier]))
        return m.AuditCheckpoint(size=cp.size, time=cp.time or 0, root=cp.root, note=note.decode())

    def latest_checkpoint(self, ctx: RequestContext) -> m.AuditCheckpoint:
        """The newest signed checkpoint."""
        self._allow(ctx, "read_audit", _CHECKPOINT)
        latest = self.setup.log.latest_checkpoint()
        if latest is None:
            raise NotFound("no checkpoint yet")
        return self._checkpoint(latest.note)

    def checkpoint_now(self, ctx: RequestContext) -> m.AuditCheckpoint:
        """Checkpoint everything durable so far."""
        self._allow(ctx, "checkpoint_audit", _CHECKPOINT)
        return self._checkpoint(self.setup.log.checkpoint_now().note)

    def search(self, ctx: RequestContext, query: EventQuery) -> m.AuditEventPage:
        """Events matching the filters, paginated by sequence number."""
        self._allow(ctx, "read_audit", _READ)
        events = [decode_event(r) for r in self.setup.log.search(query)]
        nxt = events[-1].seq if len(events) == query.limit and events else None
        return m.AuditEventPage(events=events, next=nxt)

    def inclusion_proof(self, ctx: RequestContext, index: int, size: int | None) -> m.InclusionProof:
        """The audit path of event ``index`` (in the tree of ``size``, default: current)."""
        self._allow(ctx, "read_audit", _READ)
        log = self.setup.log
        size = log.size if size is None else size
        data = log.event_data(index)
        if data is None or not 0 <= index < size:
            raise InvalidRequest("no such event in a tree of that size")
        from keygrants.audit.merkle import leaf_hash

        return m.InclusionProof(index=index, size=size, leaf_hash=leaf_hash(data),
                                proof=log.inclusion_proof(index, size))

    def consistency_proof(self, ctx: RequestContext, old_size: int, new_size: int | None
                          ) -> m.ConsistencyProof:
        """The consistency proof from ``old_size`` to ``new_size`` (default: current)."""
        self._allow(ctx, "read_audit", _READ)
        new = self.setup.log.size if new_size is None else new_size
        return m.ConsistencyProof(old_size=old_size, new_size=new,
                                  proof=self.setup.log.consistency_proof(old_size, new))

    def export(self, ctx: RequestContext, since: int = 0) -> Iterator[bytes]:
        """The JSONL export from ``since`` (see :mod:`keygrants.audit.verify`)."""
        self._allow(ctx, "read_audit", _EXPORT)
        log, vkey = self.setup.log, self.setup.vkey

        def lines() -> Iterator[bytes]:  # run once this request's own event is durable
            # A checkpoint of everything so far, this export's event included, and nothing
            # after it: `audit verify` finds every exported event signed (no UNSIGNED tail).
            signed = log.checkpoint_now()
            yield from export_lines(log, vkey=vkey, since=since, upto=signed.size)
        return lines()

    def digest(self, ctx: RequestContext, value: str) -> m.AuditDigest:
        """The keyed digest recorded in place of ``value``."""
        if len(value) > MAX_HASH_INPUT:
            raise InvalidRequest(f"value longer than {MAX_HASH_INPUT} characters")
        self._allow(ctx, "read_audit", _HASH)
        return m.AuditDigest(digest=self.setup.digester.digest(value))

    def key(self, ctx: RequestContext) -> m.AuditKey:
        """The log's origin and verifier key."""
        self._allow(ctx, "read_audit", _READ)
        return m.AuditKey(origin=self.setup.origin, vkey=self.setup.vkey)
