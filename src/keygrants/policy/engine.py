"""The deny-by-default policy engine: named Cedar policies, compiled once, decided per request.

A *policy* is a named Cedar text of up to :data:`MAX_STATEMENTS_PER_POLICY` *statements*
(``permit(...)``/``forbid(...)``). Statement ``n`` (1-based) of policy ``billing`` is called
``billing#n`` everywhere: in :attr:`Decision.reasons`, in :meth:`Decision.explain` and in
:class:`~keygrants.errors.PolicyInvalid` messages.

How a decision is made, and why it is fast:

1. At compile time each policy is parsed and validated against :data:`SCHEMA` on its own (so
   an error names its policy, statement and line:column), and every statement is converted to
   Cedar's JSON policy form under its own id ``name#n``. Cedar then reports the statements that
   decided by these ids directly: no positional ids to map back.
2. Statements are indexed by the actions and principals their *scope* can match. A decision
   evaluates only the slice for its action and principal (the statements about that action,
   that principal's id or its tags, plus those with an open scope), parsed into a
   ``cedarpy.PolicySet`` once and kept in an LRU cache. Cedar costs ~1 µs per statement in the
   set even when the scope does not match, so slicing keeps a decision's cost independent of
   how many unrelated policies exist. Slicing only ever drops statements whose scope cannot
   match, so the decision is the one Cedar would make on the whole set.
3. Entities are built from the facts with ``json.dumps`` (never by formatting Cedar source)
   and parsed into ``cedarpy.Entities`` handles kept in an LRU cache per (principal,
   resource, actions). A handle holds only what the decision can reach, so it is small and
   cheap. A resource principal is one more ``Principal`` entity (with its tag groups as
   parents), or the caller's own entity when it is the caller.
4. The context record holds only the attributes the slice's statements read: Cedar spends
   ~2 µs turning each attribute into a value (~20 µs for the grant record).

Cedar skips a statement whose evaluation errors. For a ``permit`` that means it does not allow;
for a ``forbid`` it would mean an error could *allow*, so this engine fails closed: a
``forbid`` that errors denies, and so does an error it cannot attribute to a statement.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, NamedTuple

import cedarpy

from keygrants.errors import PolicyInvalid, PolicyNotFound
from keygrants.policy.schema import ACTION_GROUPS, ACTIONS, NAMESPACE, SCHEMA, SERVICE_ID, SOURCES

__all__ = [
    "MAX_NESTING",
    "MAX_OPERATORS_PER_STATEMENT",
    "MAX_POLICIES",
    "MAX_POLICY_BYTES",
    "MAX_STATEMENTS_PER_POLICY",
    "MAX_TOTAL_STATEMENTS",
    "Decision",
    "GrantFacts",
    "KeyFacts",
    "PolicyEngine",
    "PrincipalFacts",
    "RequestFacts",
    "Statement",
]

MAX_POLICIES: Final = 10_000
MAX_POLICY_BYTES: Final = 64 * 1024
MAX_STATEMENTS_PER_POLICY: Final = 100
MAX_TOTAL_STATEMENTS: Final = 100_000
# Cedar's parser and evaluator recurse once per nesting level and crash the process (a stack
# overflow, not an exception) on deep input: ~660 nested brackets or ~16k chained operators
# on an 8 MiB stack, a quarter of that on a 2 MiB thread stack. These bounds are checked on
# our own tokens before Cedar sees the text, with a wide margin; they also keep the Cedar JSON
# of a statement within Python's recursion limit.
MAX_NESTING: Final = 32
MAX_OPERATORS_PER_STATEMENT: Final = 256

# Parsed handles kept per engine (slices) and per engine family (entities); each entry holds
# a few small entities or the statements of one slice.
_ENTITY_CACHE_SIZE: Final = 4096
_SLICE_CACHE_SIZE: Final = 4096

_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
_LONG_MAX: Final = 2**63 - 1
_MAX_MESSAGE: Final = 200

_PRINCIPAL_TYPE: Final = f"{NAMESPACE}::Principal"
_GROUP_TYPE: Final = f"{NAMESPACE}::Group"
_KEY_TYPE: Final = f"{NAMESPACE}::Key"
_SERVICE_TYPE: Final = f"{NAMESPACE}::Service"
_ACTION_TYPE: Final = f"{NAMESPACE}::Action"
# plain dicts (cedarpy accepts nothing else); shared by every request and never mutated
_SERVICE_UID: Final[Mapping[str, str]] = {"type": _SERVICE_TYPE, "id": SERVICE_ID}
_ACTION_UIDS: Final[Mapping[str, Mapping[str, str]]] = {
    a: {"type": _ACTION_TYPE, "id": a} for a in ACTIONS}
# action (or group) name -> the request actions an `action in <it>` scope matches
_ACTION_MEMBERS: Final = MappingProxyType(
    {**{a: frozenset({a}) for a in ACTIONS}, **ACTION_GROUPS})


def _action_entity(action: str) -> str:
    parents = sorted(g for g, members in ACTION_GROUPS.items() if action in members)
    return json.dumps({"uid": {"type": _ACTION_TYPE, "id": action}, "attrs": {},
                       "parents": [{"type": _ACTION_TYPE, "id": g} for g in parents]})


# Cedar entity JSON of every action and group: an action's parents are its groups
_ACTION_ENTITIES: Final = MappingProxyType({a: _action_entity(a) for a in _ACTION_MEMBERS})
_SERVICE_ENTITY: Final = json.dumps({"uid": _SERVICE_UID, "attrs": {}, "parents": []})


@functools.cache
def _schema() -> cedarpy.Schema:
    """The parsed schema handle (parsed on first use, then shared)."""
    return cedarpy.Schema.from_str(SCHEMA)


def _string_set(value: object, what: str) -> frozenset[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{what} must be a set of strings")
    out = frozenset(value)
    if not all(isinstance(v, str) for v in out):
        raise TypeError(f"{what} must be a set of strings")
    return out


def _check_long(value: object, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int")
    if not 0 <= value <= _LONG_MAX:
        raise ValueError(f"{what} must be between 0 and 2**63-1")


# --------------------------------------------------------------------------------------------
# Facts: what the service layer knows about a request, in plain hashable values.


@dataclass(frozen=True, slots=True)
class PrincipalFacts:
    """A principal: its id and its tags (each tag makes it a member of
    ``Keygrants::Group::"<tag>"``). The caller of every decision, and the resource of the
    principal-scoped actions (for ``create_principal``: the requested id and tags).

    Hashable, so the engine caches the parsed entity per distinct value.
    """

    id: str
    tags: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise TypeError("PrincipalFacts.id must be a str")
        if not self.id:
            raise ValueError("PrincipalFacts.id must not be empty")
        object.__setattr__(self, "tags", _string_set(self.tags, "PrincipalFacts.tags"))


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """The key an action is about. For ``create_key``: id ``""``, the requested name and spec."""

    id: str
    name: str
    aliases: frozenset[str] = frozenset()
    spec: str = ""
    purpose: str = ""
    state: str = ""
    tags: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for attr in ("id", "name", "spec", "purpose", "state"):
            if not isinstance(getattr(self, attr), str):
                raise TypeError(f"KeyFacts.{attr} must be a str")
        object.__setattr__(self, "aliases", _string_set(self.aliases, "KeyFacts.aliases"))
        object.__setattr__(self, "tags", _string_set(self.tags, "KeyFacts.tags"))


@dataclass(frozen=True, slots=True)
class GrantFacts:
    """The limits of a grant being created: ``ttl`` seconds, ``uses`` (0 = unlimited), whether
    proof of possession is required, the operations and audiences it allows, and its grantee."""

    ttl: int
    uses: int
    pop: bool = False
    operations: frozenset[str] = frozenset()
    audiences: frozenset[str] = frozenset()
    grantee: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.grantee, str):
            raise TypeError("GrantFacts.grantee must be a str")
        _check_long(self.ttl, "GrantFacts.ttl")
        _check_long(self.uses, "GrantFacts.uses")
        if not isinstance(self.pop, bool):
            raise TypeError("GrantFacts.pop must be a bool")
        object.__setattr__(self, "operations", _string_set(self.operations, "GrantFacts.operations"))
        object.__setattr__(self, "audiences", _string_set(self.audiences, "GrantFacts.audiences"))


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """How the request came in and when: ``source`` (one of :data:`SOURCES`), ``now`` (Unix
    seconds, passed in: the engine never reads a clock), the encryption context, and for
    ``create_grant`` the requested grant limits."""

    source: str
    now: int
    encryption_context: Mapping[str, str] | None = field(default=None, hash=False)
    grant: GrantFacts | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"RequestFacts.source must be one of {sorted(SOURCES)}")
        _check_long(self.now, "RequestFacts.now")
        if self.encryption_context is not None:
            if not isinstance(self.encryption_context, Mapping):
                raise TypeError("RequestFacts.encryption_context must be a mapping of str to str")
            ec = dict(self.encryption_context)
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in ec.items()):
                raise TypeError("RequestFacts.encryption_context must be a mapping of str to str")
            # a private copy: the caller's dict may change after the facts are built
            object.__setattr__(self, "encryption_context", MappingProxyType(ec))
        if self.grant is not None and not isinstance(self.grant, GrantFacts):
            raise TypeError("RequestFacts.grant must be a GrantFacts or None")


def _quote_context_key(key: str) -> str:
    # "k=v" must split at its first "=" unambiguously: a key that holds "=" (or the escape
    # character) is percent-encoded, so "a=b"="c" and "a"="b=c" stay different strings.
    if "=" in key or "%" in key:
        return key.replace("%", "%25").replace("=", "%3D")
    return key


_ALL_CONTEXT: Final = frozenset({"source", "now", "hour", "weekday", "encryption_context",
                                  "encryption_context_keys", "grant"})


def _context(request: RequestFacts, reads: frozenset[str] | None) -> dict[str, Any]:
    """The Cedar context record. Only the attributes the evaluated statements read are built
    (``reads``; None = all): Cedar spends ~2 µs per attribute and ~20 µs on the grant record
    turning JSON into values, and an attribute no statement reads cannot change the outcome."""
    if reads is None:
        reads = _ALL_CONTEXT
    now = request.now
    context: dict[str, Any] = {}
    if "source" in reads:
        context["source"] = request.source
    if "now" in reads:
        context["now"] = now
    if "hour" in reads:
        context["hour"] = now // 3600 % 24
    if "weekday" in reads:
        context["weekday"] = (now // 86400 + 3) % 7  # 1970-01-01 was a Thursday (Monday = 0)
    ec = request.encryption_context or {}
    if "encryption_context" in reads:
        context["encryption_context"] = [f"{_quote_context_key(k)}={v}" for k, v in ec.items()]
    if "encryption_context_keys" in reads:
        context["encryption_context_keys"] = list(ec)
    grant = request.grant
    if grant is not None and "grant" in reads:
        context["grant"] = {"ttl": grant.ttl, "uses": grant.uses, "pop": grant.pop,
                            "operations": sorted(grant.operations),
                            "audiences": sorted(grant.audiences), "grantee": grant.grantee}
    return context


# --------------------------------------------------------------------------------------------
# Statements and decisions


@dataclass(frozen=True, slots=True)
class Statement:
    """One ``permit``/``forbid`` statement of a policy, and where it is in the policy text.

    Attributes:
        policy: the policy name.
        index: 1-based position of the statement in its policy.
        effect: ``"permit"`` or ``"forbid"``.
        line: 1-based line of the statement's first token (``None`` if unknown).
        column: 1-based column of that token (``None`` if unknown).
        label: the statement's own ``@id("...")`` annotation, if it has one.
        approval: the statement carries ``@approval("required")``: a grant it permits is
            created pending until another principal approves it (break-glass).
    """

    policy: str
    index: int
    effect: Literal["permit", "forbid"]
    line: int | None = None
    column: int | None = None
    label: str | None = None
    approval: bool = False

    @property
    def ref(self) -> str:
        """``policy#index``, the id used in reasons and messages."""
        return f"{self.policy}#{self.index}"

    def describe(self) -> str:
        """``billing#1 (line 3)``, with the statement's ``@id`` label if it has one."""
        out = self.ref
        if self.line is not None:
            out += f" (line {self.line})"
        if self.label is not None:
            out += f" @id({json.dumps(self.label[:64], ensure_ascii=False)})"
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to "may principal P do action A on resource R in context C?".

    Attributes:
        allowed: whether the action is allowed.
        reasons: the statements that decided, as ``policy#n``: the matching permits when
            allowed, the matching forbids when denied, empty for the default deny.
        errors: statements that failed to evaluate (``policy#n: message``). An erroring
            statement never allows; an erroring forbid denies.
        statements: the :class:`Statement` behind each entry of ``reasons``, for :meth:`explain`.

    ``bool(decision)`` raises ``TypeError``: read :attr:`allowed`, so that ``if decision:``
    can never silently mean "allowed".
    """

    allowed: bool
    reasons: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    statements: tuple[Statement, ...] = ()

    def __bool__(self) -> bool:
        raise TypeError("a Decision has no truth value; use decision.allowed")

    @property
    def requires_approval(self) -> bool:
        """Allowed only by statements marked ``@approval("required")`` (break-glass): the
        grant is created pending. One unmarked permit is enough to skip approval."""
        return self.allowed and bool(self.statements) and all(s.approval for s in self.statements)

    def explain(self) -> str:
        """A one-line human-readable account of the decision.

        Examples: ``allowed by billing#1 (line 3)``, ``denied: no policy permits this
        (default deny)``, ``denied by forbid statement ops#2 (line 7)``.
        """
        described = [s.describe() for s in self.statements] or list(self.reasons)
        if self.allowed:
            out = f"allowed by {', '.join(described)}"
        elif described:
            noun = "statement" if len(described) == 1 else "statements"
            out = f"denied by forbid {noun} {', '.join(described)}"
        elif self.errors:
            out = "denied: no statement permits this without an evaluation error (fail closed)"
        else:
            out = "denied: no policy permits this (default deny)"
        if self.errors:
            noun = "statement" if len(self.errors) == 1 else "statements"
            out += f"; {len(self.errors)} {noun} failed to evaluate: {'; '.join(self.errors)}"
        return out


_DEFAULT_DENY: Final = Decision(allowed=False)


# --------------------------------------------------------------------------------------------
# Policy source: just enough lexing to split statements and point at a line:column. Cedar's
# own messages carry no position (cedarpy returns the message only), so positions come from
# this lexer and from re-parsing prefixes of the failing statement.

_TOKEN_RE: Final = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>//[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"?)      # the optional closing quote: an unterminated string
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)    #   is one token, where Cedar reports it
    | (?P<number>[0-9]+)
    | (?P<punct>::|==|!=|<=|>=|&&|\|\||.)
    """,
    re.VERBOSE | re.DOTALL,
)
_OPENING: Final = frozenset("([{")
_CLOSING: Final = frozenset(")]}")
# every token that adds a level to the expression tree (an upper bound: siblings count too)
_OPERATORS: Final = frozenset({"&&", "||", "==", "!=", "<", "<=", ">", ">=", "+", "-", "*", "!",
                               ".", "in", "has", "like", "is", "if"})
_EOF_MESSAGE: Final = "unexpected end of input"
_TOKEN_ERRORS: Final = ("unexpected token", "invalid token", "extra token")


class _Source:
    """A policy text split into tokens and statements, with offset → line:column."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.tokens: list[tuple[int, int]] = []
        code = list(text)
        for m in _TOKEN_RE.finditer(text):
            kind = m.lastgroup
            if kind == "comment":
                code[m.start():m.end()] = " " * (m.end() - m.start())
            elif kind != "space":
                self.tokens.append((m.start(), m.end()))
        # the text with comments blanked out, for finding names an error message quotes
        self.code = "".join(code)
        # statements as [first token, last token] index ranges, split at top-level ";"
        self.statements: list[tuple[int, int]] = []
        first = 0
        for i, (start, end) in enumerate(self.tokens):
            if text[start:end] == ";":
                self.statements.append((first, i))
                first = i + 1
        self.complete = len(self.statements)
        if first < len(self.tokens):
            self.statements.append((first, len(self.tokens) - 1))

    def position(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        line = bisect.bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1

    def span(self, statement: int) -> tuple[int, int]:
        first, last = self.statements[statement]
        return self.tokens[first][0], self.tokens[last][1]

    def too_deep(self) -> tuple[int, int, str] | None:
        """(statement, offset, message) of the first token past :data:`MAX_NESTING` or
        :data:`MAX_OPERATORS_PER_STATEMENT`, or None."""
        text = self.text
        for index, (first, last) in enumerate(self.statements):
            depth = operators = 0
            for start, end in self.tokens[first:last + 1]:
                token = text[start:end]
                if token in _OPENING:
                    depth += 1
                    if depth > MAX_NESTING:
                        return index, start, f"nested more than {MAX_NESTING} brackets deep"
                elif token in _CLOSING:
                    depth = max(0, depth - 1)
                elif token in _OPERATORS:
                    operators += 1
                    if operators > MAX_OPERATORS_PER_STATEMENT:
                        return (index, start, f"more than {MAX_OPERATORS_PER_STATEMENT} operators in "
                                "one statement; split it, or test membership in a set")
        return None


def _parses(text: str) -> str | None:
    """None if ``text`` parses as Cedar policies, else Cedar's message."""
    try:
        cedarpy.PolicySet.from_str(text)
    except ValueError as exc:
        return str(exc) or "syntax error"
    return None


def _shorten(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE - 1] + "…"


def _quoted_offset(source: _Source, statement: int, message: str) -> int | None:
    """Where the first name quoted in ``message`` (`like this`) occurs in the statement."""
    start, end = source.span(statement)
    # `quoted` names first, then a bare name ending the message ("invalid variable: tenant")
    fragments = re.findall(r"`([^`]+)`", message) + re.findall(r":\s*([A-Za-z_][A-Za-z0-9_]*)$", message)
    for fragment in fragments:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", fragment):
            pattern = rf"(?<![A-Za-z0-9_]){fragment}(?![A-Za-z0-9_])"
        else:
            pattern = re.escape(fragment)
        found = re.compile(pattern).search(source.code, start, end)
        if found:
            return found.start()
    return None


def _invalid(name: str, source: _Source, statement: int | None, offset: int | None,
             message: str) -> PolicyInvalid:
    if statement is None:
        return PolicyInvalid(f"policy {name}: {_shorten(message)}")
    if offset is None:
        offset = source.span(statement)[0]
    line, column = source.position(offset)
    return PolicyInvalid(f"{name}#{statement + 1} at line {line}:{column}: {_shorten(message)}")


def _syntax_error(name: str, source: _Source, message: str) -> PolicyInvalid:
    """Locate a parse error: the first statement that fails on its own, then, for a token
    error, the first token of that statement at which parsing goes wrong."""
    text = source.text
    tokens = source.tokens
    for index, (first, last) in enumerate(source.statements):
        start, end = tokens[first][0], tokens[last][1]
        error = _parses(text[start:end])
        if error is None:
            continue
        if error.startswith(_EOF_MESSAGE):
            # the statement just stops (a missing ";", ")" or "}"): point after its last token
            return _invalid(name, source, index, end, error)
        if not error.startswith(_TOKEN_ERRORS):
            # it parsed, then was refused while being built (a bad escape, an unknown function,
            # a string where an entity belongs...): point at what the message quotes
            return _invalid(name, source, index, _quoted_offset(source, index, error), error)

        # Cedar's parser recovers from an error and reports it only once the statement is
        # closed, so probe prefixes closed with ";": a prefix is still good while the only
        # complaint is that ";" (or nothing at all). The first bad token is where it went wrong.
        def good(count: int, start: int = start, first: int = first) -> bool:
            if count == 0:
                return True
            probe = _parses(text[start:tokens[first + count - 1][1]] + " ;")
            return probe is None or probe == "unexpected token `;`"

        lo, hi = 0, last - first + 1  # good(lo); the whole statement is not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if good(mid):
                lo = mid
            else:
                hi = mid
        return _invalid(name, source, index, tokens[first + lo][0], error)
    return _invalid(name, source, None, None, message)


_ACTION_SUFFIX_RE: Final = re.compile(r"\s+for \S*Action::\"[^\"]*\"$")


def _schema_error(name: str, source: _Source, errors: list[cedarpy.ValidationError],
                  statement_count: int) -> PolicyInvalid:
    first = errors[0]
    # Cedar repeats one mistake once per action it type-checks against: count it once
    distinct = {(e.policy_id, _ACTION_SUFFIX_RE.sub("", e.error)) for e in errors}
    message = _ACTION_SUFFIX_RE.sub("", re.sub(r"^for policy `[^`]*`,\s*", "", first.error))
    optional = re.search(r"optional attribute `([^`]+)` in context", message)
    if optional:
        message += f"; test it first: `context has {optional.group(1)} && ...`"
    if len(distinct) > 1:
        message = f"{_shorten(message)} (+{len(distinct) - 1} more)"
    match = re.fullmatch(r"policy(\d+)", first.policy_id)
    # positional ids follow the statements in text order; trust them only if our split agrees
    if match is None or len(source.statements) != statement_count or source.complete != statement_count:
        return _invalid(name, source, None, None, message)
    index = int(match.group(1))
    return _invalid(name, source, index, _quoted_offset(source, index, first.error), message)


# --------------------------------------------------------------------------------------------
# Compilation of one policy


# A statement's principal scope, for slicing: None = may match any principal,
# ("id", p) = only principal p, ("group", g) = only principals tagged g.
_PrincipalKey = tuple[str, str] | None


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One statement, ready to be put in a slice."""

    statement: Statement
    est: str  # the statement as Cedar JSON policy text
    actions: frozenset[str] | None  # the request actions its scope can match; None = any
    principal: _PrincipalKey
    # the attributes its conditions read; None = all of them
    principal_attrs: frozenset[str] | None
    resource_attrs: frozenset[str] | None
    context_attrs: frozenset[str] | None
    action_literals: frozenset[str]  # actions its conditions name as entity literals


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError("policy name must be a str")
    if not _NAME_RE.fullmatch(name):
        raise PolicyInvalid("invalid policy name: use 1-128 characters from A-Z a-z 0-9 . _ -")
    return name


def _uid(node: object) -> tuple[str, str] | None:
    if isinstance(node, dict) and isinstance(node.get("type"), str) and isinstance(node.get("id"), str):
        return node["type"], node["id"]
    return None


def _action_scope(scope: object) -> frozenset[str] | None:
    """The request actions a statement's action scope can match; None = any (or unknown)."""
    if not isinstance(scope, dict):
        return None
    op = scope.get("op")
    if op == "==":
        uids = [scope.get("entity")]
    elif op == "in":
        uids = scope["entities"] if isinstance(scope.get("entities"), list) else [scope.get("entity")]
    else:
        return None
    actions: set[str] = set()
    for node in uids:
        uid = _uid(node)
        if uid is None or uid[0] != _ACTION_TYPE:
            return None  # not understood: keep the statement for every action
        members = _ACTION_MEMBERS.get(uid[1], frozenset())
        actions.update(members if op == "in" else members & {uid[1]})
    return frozenset(actions)


def _principal_scope(scope: object) -> _PrincipalKey:
    """Which principals a statement's principal scope can match (None = any, or unknown)."""
    if not isinstance(scope, dict):
        return None
    op = scope.get("op")
    if op == "is":
        inner = scope.get("in")
        if not isinstance(inner, dict) or scope.get("entity_type") != _PRINCIPAL_TYPE:
            return None
        op, node = "in", inner.get("entity")
    elif op in ("==", "in"):
        node = scope.get("entity")
    else:
        return None
    uid = _uid(node)
    if uid is None:
        return None
    if uid[0] == _PRINCIPAL_TYPE:
        # principals have only groups as parents, so `in Principal::"p"` is `== Principal::"p"`
        return ("id", uid[1])
    if uid[0] == _GROUP_TYPE and op == "in":
        # groups have no parents: `in Group::"g"` holds exactly for principals tagged g
        return ("group", uid[1])
    return None


def _positional(policy_id: str) -> tuple[int, str]:
    match = re.fullmatch(r"policy(\d+)", policy_id)
    return (int(match.group(1)) if match else -1, policy_id)


_Reads = dict[str, set[str] | None]  # variable -> attributes read (None = all of them)
_READ_VARS: Final = ("principal", "resource", "context")


def _root_var(node: object) -> str | None:
    """The variable an attribute chain starts from (``context`` for ``context.grant.ttl``)."""
    while isinstance(node, dict) and len(node) == 1:
        if isinstance(node.get("Var"), str):
            return str(node["Var"])
        inner = node.get(".")
        if not isinstance(inner, dict):
            return None
        node = inner.get("left")
    return None


def _add_read(reads: _Reads, var: str, attr: str | None) -> None:
    current = reads[var]
    if attr is None:
        reads[var] = None
    elif current is not None:
        current.add(attr)


def _attribute_reads(node: object, reads: _Reads) -> None:
    """Collect which attributes of ``principal``, ``resource`` and ``context`` a statement's
    conditions read. Attributes are only reached with ``.`` and ``has``; an entity used as a
    value (compared, tested with ``in``/``is``) is just its uid. Anything not recognised
    counts as reading every attribute, so a miss can only ever add attributes."""
    if isinstance(node, list):
        for item in node:
            _attribute_reads(item, reads)
        return
    if not isinstance(node, dict):
        return
    if len(node) == 1 and node.get("Var") == "context":
        reads["context"] = None  # the record as a whole
        return
    if len(node) == 1:
        ((op, inner),) = node.items()
        if op in (".", "has") and isinstance(inner, dict) and isinstance(inner.get("attr"), str):
            left = inner.get("left")
            if isinstance(left, dict) and len(left) == 1 and left.get("Var") in _READ_VARS:
                _add_read(reads, str(left["Var"]), str(inner["attr"]))
                return
            if _root_var(left) != "context":
                # an attribute of some computed value, which may be the principal or the
                # resource (`(if c then principal else resource).name`): keep them whole
                _add_read(reads, "principal", None)
                _add_read(reads, "resource", None)
            _attribute_reads(left, reads)
            return
    for value in node.values():
        _attribute_reads(value, reads)


def _freeze(attrs: set[str] | None) -> frozenset[str] | None:
    return None if attrs is None else frozenset(attrs)


def _union(parts: Iterable[frozenset[str] | None]) -> frozenset[str] | None:
    out: set[str] = set()
    for part in parts:
        if part is None:
            return None
        out |= part
    return frozenset(out)


def _action_literals(node: object, out: set[str]) -> None:
    """Collect the actions a statement names as entity literals (``Keygrants::Action::"x"``)."""
    if isinstance(node, list):
        for item in node:
            _action_literals(item, out)
    elif isinstance(node, dict):
        if node.get("type") == _ACTION_TYPE and node.get("id") in _ACTION_ENTITIES:
            out.add(node["id"])
        for value in node.values():
            _action_literals(value, out)


def _compile(name: str, text: str) -> tuple[_Compiled, ...]:
    """Parse, validate and index one policy.

    Raises:
        PolicyInvalid: for a bad name, an oversize text, a syntax or a schema error.
        TypeError: when ``name`` or ``text`` is not a str.
    """
    _check_name(name)
    if not isinstance(text, str):
        raise TypeError("policy text must be a str")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise PolicyInvalid(f"policy {name}: text is not valid Unicode (a lone surrogate)") from None
    if size > MAX_POLICY_BYTES:
        raise PolicyInvalid(f"policy {name}: text larger than {MAX_POLICY_BYTES} bytes")
    source = _Source(text)
    if len(source.statements) > MAX_STATEMENTS_PER_POLICY:
        # checked on the lexer's count first so an oversize policy is not even parsed
        raise PolicyInvalid(f"policy {name}: more than {MAX_STATEMENTS_PER_POLICY} statements")
    deep = source.too_deep()
    if deep is not None:
        raise _invalid(name, source, *deep)
    try:
        document = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        raise _syntax_error(name, source, str(exc)) from exc
    # Cedar numbers the statements of one parse policy0, policy1... in text order
    ids = sorted(document.get("staticPolicies", {}), key=_positional)
    if document.get("templates"):
        # a template (?principal/?resource) authorizes nothing until linked, and linking is not
        # part of this model; refuse it rather than store a statement that silently never applies
        template = next(iter(document["templates"]))
        match = re.fullmatch(r"policy(\d+)", template)
        index = int(match.group(1)) if match and source.complete > int(match.group(1)) else None
        raise _invalid(name, source, index, None,
                       "templates (?principal, ?resource) are not supported; name the principal or group")
    if len(ids) > MAX_STATEMENTS_PER_POLICY:
        raise PolicyInvalid(f"policy {name}: more than {MAX_STATEMENTS_PER_POLICY} statements")
    result = cedarpy.validate_policies(text, _schema())
    if not result.validation_passed:
        raise _schema_error(name, source, result.errors, len(ids)) from None
    positioned = source.complete == len(ids) == len(source.statements)
    compiled = []
    for index, policy_id in enumerate(ids):
        body = document["staticPolicies"][policy_id]
        line = column = None
        if positioned:
            line, column = source.position(source.span(index)[0])
        annotations = body.get("annotations", {})
        label = annotations.get("id")
        approval = annotations.get("approval")
        if approval is not None and approval != "required":
            raise PolicyInvalid(f'policy {name}: statement {index + 1}: the only @approval '
                                f'annotation is @approval("required")')
        statement = Statement(policy=name, index=index + 1,
                              effect="forbid" if body.get("effect") == "forbid" else "permit",
                              line=line, column=column,
                              label=label if isinstance(label, str) else None,
                              approval=approval == "required")
        reads: _Reads = {var: set() for var in _READ_VARS}
        _attribute_reads(body.get("conditions"), reads)
        literals: set[str] = set()
        _action_literals(body.get("conditions"), literals)
        compiled.append(_Compiled(
            statement=statement,
            est=json.dumps(body, ensure_ascii=False, separators=(",", ":")),
            actions=_action_scope(body.get("action")),
            principal=_principal_scope(body.get("principal")),
            principal_attrs=_freeze(reads["principal"]),
            resource_attrs=_freeze(reads["resource"]),
            context_attrs=_freeze(reads["context"]),
            action_literals=frozenset(literals)))
    return tuple(compiled)


# --------------------------------------------------------------------------------------------
# Entities


class _Needs(NamedTuple):
    """The parts of the entities a slice can reach (hashable: part of the cache key)."""

    actions: frozenset[str]  # the request action and any action the statements name
    principal_attrs: frozenset[str] | None
    resource_attrs: frozenset[str] | None


# Entity JSON is cached apart from the parsed handles: a principal or a key recurs across
# many (principal, key, action) handles, and json.dumps is a fair share of building one.
@functools.lru_cache(maxsize=_ENTITY_CACHE_SIZE)
def _principal_json(principal: PrincipalFacts, attrs: frozenset[str] | None) -> str:
    tags = sorted(principal.tags)
    values: dict[str, Any] = {"id": principal.id, "tags": tags}
    return json.dumps({
        "uid": {"type": _PRINCIPAL_TYPE, "id": principal.id},
        "attrs": values if attrs is None else {k: v for k, v in values.items() if k in attrs},
        "parents": [{"type": _GROUP_TYPE, "id": t} for t in tags]})


@functools.lru_cache(maxsize=_ENTITY_CACHE_SIZE)
def _key_json(key: KeyFacts, attrs: frozenset[str] | None) -> str:
    values: dict[str, Any] = {"id": key.id, "name": key.name, "aliases": sorted(key.aliases),
                              "spec": key.spec, "purpose": key.purpose, "state": key.state,
                              "tags": sorted(key.tags)}
    return json.dumps({
        "uid": {"type": _KEY_TYPE, "id": key.id},
        "attrs": values if attrs is None else {k: v for k, v in values.items() if k in attrs},
        "parents": []})


class _EntityCache:
    """Parsed entity handles, kept for the (principal, resource, needs) seen lately.

    A handle holds only what the decision can reach: the principal (its tags as ``Group``
    parents), the resource (a key, or a principal with its tags as ``Group`` parents; the
    caller's own entity when the resource is the caller), the service, and the request action
    plus any action a statement names,
    each with its groups as parents; and of the principal and the resource only the
    attributes the statements read. Cedar spends ~2-5 µs parsing each attribute and entity, and an entity
    nothing refers to need not exist for ``in`` to hold (an entity's ancestors are stored on
    the entity), so this keeps a handle cheap to build and small to keep.

    Handles do not depend on the policies, so every engine derived from another
    (``with_policy``...) shares its cache and starts warm.
    """

    def __init__(self) -> None:
        self.get = functools.lru_cache(maxsize=_ENTITY_CACHE_SIZE)(self._build)

    @staticmethod
    def _build(principal: PrincipalFacts, resource: KeyFacts | PrincipalFacts | None,
               needs: _Needs) -> cedarpy.Entities:
        if resource == principal:
            # one uid is one entity: it must carry what either role of it reads
            parts = [_principal_json(principal, _union((needs.principal_attrs,
                                                        needs.resource_attrs))), _SERVICE_ENTITY]
        else:
            parts = [_principal_json(principal, needs.principal_attrs), _SERVICE_ENTITY]
            if isinstance(resource, KeyFacts):
                parts.append(_key_json(resource, needs.resource_attrs))
            elif resource is not None:
                parts.append(_principal_json(resource, needs.resource_attrs))
        parts.extend(_ACTION_ENTITIES[a] for a in sorted(needs.actions))
        return cedarpy.Entities.from_json_str(f"[{','.join(parts)}]")


# --------------------------------------------------------------------------------------------
# The engine

_ERROR_RE: Final = re.compile(r"error while evaluating policy `([^`]*)`:\s*(.*)", re.DOTALL)


class _Slice(NamedTuple):
    policies: cedarpy.PolicySet
    # what the statements can look at; an attribute none of them reads cannot change the
    # outcome, so entities and context carry only these (None = all)
    needs: _Needs
    context_attrs: frozenset[str] | None


class PolicyEngine:
    """An immutable set of named policies that answers authorization questions.

    Deny by default: an action is allowed only if some ``permit`` statement matches and no
    ``forbid`` statement does (and no ``forbid`` fails to evaluate). Changing the policies
    returns a new engine (:meth:`with_policy`, :meth:`without_policy`); the old one keeps
    serving until the caller swaps the reference, so a refused policy never disturbs the
    policies in force.

    Args:
        policies: policy name → Cedar text. Names match ``[A-Za-z0-9._-]{1,128}``.

    Raises:
        PolicyInvalid: when a name, a text or the number of policies is refused, or a policy
            does not parse or does not match :data:`SCHEMA` (the message gives
            ``name#statement at line L:C``).
        TypeError: when ``policies`` is not a mapping of str to str.
    """

    __slots__ = (
        "__weakref__",
        "_entities",
        "_index",
        "_named_groups",
        "_named_principals",
        "_policies",
        "_slice",
        "_statement_count",
        "_statements",
    )

    def __init__(self, policies: Mapping[str, str] | None = None) -> None:
        if policies is None:
            policies = {}
        if not isinstance(policies, Mapping):
            raise TypeError("policies must be a mapping of policy name to Cedar text")
        if len(policies) > MAX_POLICIES:
            raise PolicyInvalid(f"too many policies (limit {MAX_POLICIES})")
        self._setup({name: _compile(name, text) for name, text in policies.items()}, _EntityCache())

    def _setup(self, compiled: dict[str, tuple[_Compiled, ...]], entities: _EntityCache) -> None:
        total = sum(len(c) for c in compiled.values())
        if total > MAX_TOTAL_STATEMENTS:
            raise PolicyInvalid(f"too many statements in all policies (limit {MAX_TOTAL_STATEMENTS})")
        self._policies = MappingProxyType(dict(sorted(compiled.items())))
        self._entities = entities
        self._statement_count = total
        self._statements: dict[str, _Compiled] = {}
        index: dict[tuple[str | None, _PrincipalKey], list[str]] = {}
        for statements in self._policies.values():
            for c in statements:
                ref = c.statement.ref
                self._statements[ref] = c
                for action in (None,) if c.actions is None else sorted(c.actions):
                    index.setdefault((action, c.principal), []).append(ref)
        self._index = {k: tuple(v) for k, v in index.items()}
        keys = [p for _, p in self._index if p is not None]
        self._named_principals = frozenset(v for kind, v in keys if kind == "id")
        self._named_groups = frozenset(v for kind, v in keys if kind == "group")
        self._slice = functools.lru_cache(maxsize=_SLICE_CACHE_SIZE)(self._build_slice)

    def _derive(self, compiled: dict[str, tuple[_Compiled, ...]]) -> PolicyEngine:
        engine = PolicyEngine.__new__(PolicyEngine)
        engine._setup(compiled, self._entities)
        return engine

    # ---- writes ----------------------------------------------------------------------------

    @staticmethod
    def validate(name: str, text: str) -> int:
        """Check a policy as it would be written, without changing any engine.

        Args:
            name: the policy name (``[A-Za-z0-9._-]{1,128}``).
            text: the Cedar policy text (at most :data:`MAX_POLICY_BYTES` bytes and
                :data:`MAX_STATEMENTS_PER_POLICY` statements).

        Returns:
            The number of statements in the policy.

        Raises:
            PolicyInvalid: for a bad name, an oversize text, a syntax or a schema error; the
                message reads ``name#statement at line L:C: what is wrong``.
            TypeError: when ``name`` or ``text`` is not a str.
        """
        return len(_compile(name, text))

    def with_policy(self, name: str, text: str) -> PolicyEngine:
        """A new engine with policy ``name`` added or replaced; this engine is unchanged.

        Raises:
            PolicyInvalid: as :meth:`validate`, or when the policy or statement limits would be
                exceeded.
            TypeError: when ``name`` or ``text`` is not a str.
        """
        compiled = _compile(name, text)
        if name not in self._policies and len(self._policies) >= MAX_POLICIES:
            raise PolicyInvalid(f"too many policies (limit {MAX_POLICIES})")
        return self._derive({**self._policies, name: compiled})

    def without_policy(self, name: str) -> PolicyEngine:
        """A new engine without policy ``name``; this engine is unchanged.

        Raises:
            PolicyNotFound: when there is no policy of that name.
        """
        if name not in self._policies:
            raise PolicyNotFound()
        return self._derive({n: c for n, c in self._policies.items() if n != name})

    # ---- reads -----------------------------------------------------------------------------

    def policy_names(self) -> tuple[str, ...]:
        """The names of the policies in force, sorted."""
        return tuple(self._policies)

    def statements(self, name: str) -> tuple[Statement, ...]:
        """The statements of policy ``name``, in order.

        Raises:
            PolicyNotFound: when there is no policy of that name.
        """
        compiled = self._policies.get(name)
        if compiled is None:
            raise PolicyNotFound()
        return tuple(c.statement for c in compiled)

    @property
    def statement_count(self) -> int:
        """The number of statements across all policies."""
        return self._statement_count

    def __contains__(self, name: object) -> bool:
        return name in self._policies

    def __len__(self) -> int:
        return len(self._policies)

    def __repr__(self) -> str:
        return f"<PolicyEngine {len(self._policies)} policies, {self._statement_count} statements>"

    # ---- decisions -------------------------------------------------------------------------

    def _build_slice(self, action: str, principal_id: str | None,
                     groups: frozenset[str]) -> _Slice | None:
        """The statements that may apply to ``action`` by this principal, parsed; None if
        there are none (default deny)."""
        keys: list[_PrincipalKey] = [None]
        if principal_id is not None:
            keys.append(("id", principal_id))
        keys.extend(("group", g) for g in sorted(groups))
        refs: dict[str, None] = {}
        for key in keys:
            for act in (action, None):
                refs.update(dict.fromkeys(self._index.get((act, key), ())))
        if not refs:
            return None
        body = ",".join(f"{json.dumps(ref)}:{self._statements[ref].est}" for ref in refs)
        policies = cedarpy.PolicySet.from_json_str(
            f'{{"staticPolicies":{{{body}}},"templates":{{}},"templateLinks":[]}}')
        compiled = [self._statements[ref] for ref in refs]
        needs = _Needs(actions=frozenset({action}).union(*(c.action_literals for c in compiled)),
                       principal_attrs=_union(c.principal_attrs for c in compiled),
                       resource_attrs=_union(c.resource_attrs for c in compiled))
        return _Slice(policies, needs, _union(c.context_attrs for c in compiled))

    def decide(self, principal: PrincipalFacts, action: str,
               resource: KeyFacts | PrincipalFacts | None, request: RequestFacts) -> Decision:
        """Decide whether ``principal`` may do ``action`` on ``resource``.

        This is also the answer to ``test``: build the facts for "principal P, action A, key K,
        context C" and read :meth:`Decision.explain`. To test a policy before writing it, ask
        ``engine.with_policy(name, text).decide(...)``.

        Args:
            principal: the caller.
            action: one of :data:`ACTIONS`.
            resource: the key for a key-scoped action; the target principal for a
                principal-scoped one (for ``create_principal``, the requested id and tags);
                ``None`` for a service-scoped one. A target with the caller's id is the
                caller: it must be equal to ``principal`` (one uid is one Cedar entity).
            request: source, time, encryption context and grant limits.

        Returns:
            The :class:`Decision`, with the statements that decided.

        Raises:
            ValueError: for an unknown action, a resource of the wrong kind for it, a resource
                principal with the caller's id but other tags, or facts Cedar cannot represent
                (a string holding a lone surrogate).
            TypeError: when a facts argument has the wrong type.
        """
        kind = ACTIONS.get(action) if isinstance(action, str) else None
        if kind is None:
            raise ValueError(f"unknown action {action!r}")
        if not isinstance(principal, PrincipalFacts):
            raise TypeError("principal must be a PrincipalFacts")
        if not isinstance(request, RequestFacts):
            raise TypeError("request must be a RequestFacts")
        if kind == "key":
            if not isinstance(resource, KeyFacts):
                raise ValueError(f"action {action!r} needs a KeyFacts resource")
            resource_uid: Mapping[str, str] = {"type": _KEY_TYPE, "id": resource.id}
        elif kind == "principal":
            if not isinstance(resource, PrincipalFacts):
                raise ValueError(f"action {action!r} needs a PrincipalFacts resource")
            if resource.id == principal.id and resource != principal:
                raise ValueError("a resource principal with the caller's id must be the caller's "
                                 "facts (one uid is one entity)")
            resource_uid = {"type": _PRINCIPAL_TYPE, "id": resource.id}
        elif resource is not None:
            raise ValueError(f"action {action!r} is not about a key or a principal; "
                             "pass resource=None")
        else:
            resource_uid = _SERVICE_UID

        pid = principal.id if principal.id in self._named_principals else None
        groups = principal.tags & self._named_groups if self._named_groups else frozenset()
        found = self._slice(action, pid, groups)
        if found is None:
            return _DEFAULT_DENY
        policies, needs, context_attrs = found
        entities = self._entities.get(principal, resource, needs)
        result = cedarpy.is_authorized(
            {"principal": {"type": _PRINCIPAL_TYPE, "id": principal.id},
             "action": _ACTION_UIDS[action], "resource": resource_uid,
             "context": _context(request, context_attrs)},
            policies, entities)
        return self._decision(result.allowed, result.diagnostics.reasons, result.diagnostics.errors)

    def _decision(self, allowed: bool, reasons: list[str], errors: list[str]) -> Decision:
        failed: list[str] = []
        messages: list[str] = []
        fail_closed = False
        for error in errors:
            match = _ERROR_RE.fullmatch(error)
            entry = self._statements.get(match.group(1)) if match else None
            if match is None or entry is None:
                # an error we cannot pin on a statement (a malformed request...): deny
                fail_closed = True
                messages.append(_shorten(error))
                continue
            messages.append(f"{match.group(1)}: {_shorten(match.group(2))}")
            if entry.statement.effect == "forbid":
                failed.append(match.group(1))
                fail_closed = True
        if allowed and fail_closed:
            allowed, reasons = False, failed
        statements = sorted((self._statements[r].statement for r in reasons if r in self._statements),
                            key=lambda s: (s.policy, s.index))
        return Decision(allowed=allowed, reasons=tuple(s.ref for s in statements),
                        errors=tuple(messages), statements=tuple(statements))
