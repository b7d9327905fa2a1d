"""The Cedar schema every keygrants policy is validated against.

One namespace, ``Keygrants``, four entity types and one action per service operation:

- ``Group``: a principal tag. A principal tagged ``payments`` is a member of
  ``Keygrants::Group::"payments"``, so ``principal in Keygrants::Group::"payments"`` attaches a
  statement to every principal carrying that tag.
- ``Principal in [Group]``: a principal, with ``id`` and ``tags``: the caller, and the resource
  of the principal-administration actions (the principal being described, changed, deleted or
  given credentials). For ``create_principal`` it is a provisional principal with the
  requested id and tags, so policies can restrict who may create which principals.
- ``Key``: the key an action is about (``id``, ``name``, ``aliases``, ``spec``, ``purpose``,
  ``state``, ``tags``). For ``create_key`` it is a provisional key with id ``""`` carrying the
  requested name and spec, so policies can restrict creation by name pattern.
- ``Service``: the singleton ``Keygrants::Service::"keygrants"``, the resource of every action
  that is not about one key or one principal (listing keys and principals, random bytes,
  policy and audit admin).

Actions are grouped (Cedar action ``memberOf``) so a statement can say
``action in Keygrants::Action::"crypto"``. The request context is one record type for every
action; all its attributes are always present except ``grant`` (``context has grant``).

:data:`SCHEMA` is generated from :data:`ACTIONS` and :data:`ACTION_GROUPS`, so the tables the
service layer reads and the text Cedar validates against cannot drift apart.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal

__all__ = [
    "ACTIONS",
    "ACTION_GROUPS",
    "NAMESPACE",
    "SCHEMA",
    "SERVICE_ID",
    "SOURCES",
]

NAMESPACE: Final = "Keygrants"

#: The id of the one ``Keygrants::Service`` entity.
SERVICE_ID: Final = "keygrants"

#: The values of ``context.source``: how the caller authenticated.
SOURCES: Final = frozenset({"signature", "api_key", "mtls", "admin_token"})

_KEY_ACTIONS = (
    "describe_key", "update_key", "rotate_key", "disable_key", "enable_key",
    "schedule_key_deletion", "cancel_key_deletion", "create_alias", "delete_alias", "list_aliases",
    "get_public_key", "encrypt", "decrypt", "re_encrypt", "generate_data_key", "sign", "verify",
    "mac", "verify_mac", "derive", "create_grant", "revoke_grant", "approve_grant", "list_grants",
    "create_key",
)
_PRINCIPAL_ACTIONS = (
    "create_principal", "describe_principal", "update_principal", "delete_principal",
    "manage_credentials", "revoke_grants",
)
_SERVICE_ACTIONS = (
    "list_keys", "generate_random", "list_principals", "put_policy", "get_policy",
    "list_policies", "delete_policy", "test_policy", "read_audit", "checkpoint_audit",
    "rotate_issuer_key", "read_metrics",
)

#: Every action a policy can name, mapped to the kind of its resource: ``"key"`` (a ``Key``
#: entity; :meth:`PolicyEngine.decide` needs a :class:`KeyFacts`), ``"principal"`` (the
#: target ``Principal``; a :class:`PrincipalFacts`) or ``"service"`` (the ``Service``
#: singleton; no resource is passed).
ACTIONS: Final[Mapping[str, Literal["key", "principal", "service"]]] = MappingProxyType({
    **dict.fromkeys(_KEY_ACTIONS, "key"), **dict.fromkeys(_PRINCIPAL_ACTIONS, "principal"),
    **dict.fromkeys(_SERVICE_ACTIONS, "service"),
})

#: Action groups (Cedar ``Keygrants::Action::"<group>"``) and their member actions.
ACTION_GROUPS: Final[Mapping[str, frozenset[str]]] = MappingProxyType({
    "crypto": frozenset({
        "encrypt", "decrypt", "re_encrypt", "generate_data_key", "sign", "verify", "mac",
        "verify_mac", "derive", "generate_random",
    }),
    "key_admin": frozenset({
        "create_key", "describe_key", "update_key", "rotate_key", "disable_key", "enable_key",
        "schedule_key_deletion", "cancel_key_deletion", "create_alias", "delete_alias", "list_aliases",
        "get_public_key", "list_keys",
    }),
    "grants": frozenset({"create_grant", "revoke_grant", "approve_grant", "list_grants",
                         "revoke_grants"}),
    "principal_admin": frozenset({
        "create_principal", "describe_principal", "list_principals", "update_principal",
        "delete_principal", "manage_credentials",
    }),
    "policy_admin": frozenset({
        "put_policy", "get_policy", "list_policies", "delete_policy", "test_policy",
    }),
    "audit": frozenset({"read_audit", "checkpoint_audit"}),
    # the grant-token issuer keys (a rotation changes what every verifier must fetch)
    "issuer": frozenset({"rotate_issuer_key"}),
    # Describe/list/get only. read_audit is left out on purpose: the audit log says who did what
    # to which key, which a metadata dashboard should not see unless granted "audit" too.
    "read": frozenset({
        "describe_key", "list_aliases", "get_public_key", "list_keys", "list_grants",
        "describe_principal", "list_principals", "get_policy", "list_policies", "read_metrics",
    }),
})

_HEADER = f"""\
// keygrants policy schema (Cedar). Generated from keygrants.policy.ACTIONS and ACTION_GROUPS.
namespace {NAMESPACE} {{
  // A principal tag: a principal tagged "payments" is `in {NAMESPACE}::Group::"payments"`.
  entity Group;

  // The caller, and the target of the principal-administration actions. For
  // create_principal: a provisional principal with the requested id and tags.
  entity Principal in [Group] {{
    id: String,
    tags: Set<String>
  }};

  // For create_key: a provisional key, id "", with the requested name and spec.
  entity Key {{
    id: String,
    name: String,
    aliases: Set<String>,
    spec: String,
    purpose: String,
    state: String,
    tags: Set<String>
  }};

  // The singleton {NAMESPACE}::Service::"{SERVICE_ID}": resource of actions not about one key
  // or one principal.
  entity Service;

  // Limits of the grant being created (create_grant); uses 0 = unlimited.
  type GrantRequest = {{
    ttl: Long,
    uses: Long,
    pop: Bool,
    operations: Set<String>,
    audiences: Set<String>,
    grantee: String
  }};

  // Always present except grant (test it with `context has grant`). Times are UTC;
  // weekday 0 = Monday. encryption_context holds "key=value" strings.
  type RequestContext = {{
    source: String,
    now: Long,
    hour: Long,
    weekday: Long,
    encryption_context: Set<String>,
    encryption_context_keys: Set<String>,
    grant?: GrantRequest
  }};

  // Action groups: `action in {NAMESPACE}::Action::"crypto"`.
  action {", ".join(ACTION_GROUPS)};
"""


_RESOURCE_TYPES: Final = {"key": "Key", "principal": "Principal", "service": "Service"}


def _schema_text() -> str:
    """The schema: the fixed header, then one ``action`` line per (groups, resource) class."""
    classes: dict[tuple[tuple[str, ...], str], list[str]] = {}
    for action, resource_kind in ACTIONS.items():
        groups = tuple(g for g in ACTION_GROUPS if action in ACTION_GROUPS[g])
        classes.setdefault((groups, resource_kind), []).append(action)
    blocks = []
    for (groups, kind), actions in classes.items():
        names = textwrap.fill(", ".join(f'"{a}"' for a in actions), width=96,
                              initial_indent="  action ", subsequent_indent="         ",
                              break_on_hyphens=False)
        member_of = f"\n    in [{', '.join(groups)}]" if groups else ""
        resource = _RESOURCE_TYPES[kind]
        blocks.append(f"{names}{member_of}\n    appliesTo {{ principal: Principal, resource: {resource}, "
                      f"context: RequestContext }};")
    return _HEADER + "\n" + "\n\n".join(blocks) + "\n}\n"


#: The canonical schema text (Cedar schema syntax).
SCHEMA: Final = _schema_text()
