"""Policy: deny-by-default authorization on Cedar.

Named Cedar policies, validated against :data:`SCHEMA` when written, compiled once into a
:class:`PolicyEngine` that answers "may principal P do action A on key K in context C?" with a
:class:`Decision` naming the statements that decided. Pure: no I/O, no clock (time is passed
in :class:`RequestFacts`). The model for users is in ``docs/policy.md``.
"""

from __future__ import annotations

from keygrants.policy.engine import (
    MAX_NESTING,
    MAX_OPERATORS_PER_STATEMENT,
    MAX_POLICIES,
    MAX_POLICY_BYTES,
    MAX_STATEMENTS_PER_POLICY,
    MAX_TOTAL_STATEMENTS,
    Decision,
    GrantFacts,
    KeyFacts,
    PolicyEngine,
    PrincipalFacts,
    RequestFacts,
    Statement,
)
from keygrants.policy.schema import ACTION_GROUPS, ACTIONS, NAMESPACE, SCHEMA, SERVICE_ID, SOURCES

__all__ = [
    "ACTIONS",
    "ACTION_GROUPS",
    "MAX_NESTING",
    "MAX_OPERATORS_PER_STATEMENT",
    "MAX_POLICIES",
    "MAX_POLICY_BYTES",
    "MAX_STATEMENTS_PER_POLICY",
    "MAX_TOTAL_STATEMENTS",
    "NAMESPACE",
    "SCHEMA",
    "SERVICE_ID",
    "SOURCES",
    "Decision",
    "GrantFacts",
    "KeyFacts",
    "PolicyEngine",
    "PrincipalFacts",
    "RequestFacts",
    "Statement",
]
