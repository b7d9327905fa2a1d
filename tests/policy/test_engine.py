"""The Cedar policy engine: deny by default, scopes and conditions, explain, validation, limits."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import cedarpy
import pytest

import keygrants.policy.engine as engine_module
from keygrants.errors import PolicyInvalid, PolicyNotFound
from keygrants.policy import (
    ACTION_GROUPS,
    ACTIONS,
    MAX_NESTING,
    MAX_OPERATORS_PER_STATEMENT,
    MAX_POLICY_BYTES,
    MAX_STATEMENTS_PER_POLICY,
    SCHEMA,
    SERVICE_ID,
    Decision,
    GrantFacts,
    KeyFacts,
    PolicyEngine,
    PrincipalFacts,
    RequestFacts,
)

# 2024-01-01 was a Monday; 10:00:00 UTC
MONDAY_10H = 1_704_103_200
HOUR = 3600
DAY = 86400
ANYTHING = "permit(principal, action, resource);"
# overflows a Cedar Long at run time, so the statement fails to evaluate
OVERFLOW = "context.now * 4611686018427387904 > 0"

BILLING = PrincipalFacts("svc-billing", frozenset({"payments"}))
OTHER = PrincipalFacts("svc-other", frozenset({"web"}))
TEAM_A_MEMBER = PrincipalFacts("alice", frozenset({"team-a"}))
TEAM_B_MEMBER = PrincipalFacts("bob", frozenset({"team-b"}))
HELPDESK = PrincipalFacts("helpdesk-1", frozenset({"helpdesk"}))
PAYMENTS_KEY = KeyFacts(id="k-1", name="payments-main", aliases=frozenset({"payments"}),
                        spec="aes-256-gcm", purpose="encrypt", state="enabled",
                        tags=frozenset({"pci"}))
OTHER_KEY = KeyFacts(id="k-2", name="web-sessions", aliases=frozenset({"sessions"}),
                     spec="aes-256-gcm", purpose="encrypt", state="enabled",
                     tags=frozenset({"web"}))


def request(source: str = "mtls", now: int = MONDAY_10H, context: dict[str, str] | None = None,
            grant: GrantFacts | None = None) -> RequestFacts:
    return RequestFacts(source=source, now=now, encryption_context=context, grant=grant)


def decide(engine: PolicyEngine, action: str = "encrypt", principal: PrincipalFacts = BILLING,
           key: KeyFacts | None = PAYMENTS_KEY, req: RequestFacts | None = None,
           target: PrincipalFacts = OTHER) -> Decision:
    kind = ACTIONS[action]
    resource = key if kind == "key" else target if kind == "principal" else None
    return engine.decide(principal, action, resource, req or request())


def allowed(policy: str, **kwargs: object) -> bool:
    return decide(PolicyEngine({"p": policy}), **kwargs).allowed  # type: ignore[arg-type]


def invalid(text: str, name: str = "t") -> str:
    with pytest.raises(PolicyInvalid) as info:
        PolicyEngine.validate(name, text)
    assert info.value.code == "policy_invalid" and info.value.status == 400
    assert len(info.value.message) < 300, "policy errors stay short"
    return info.value.message


# ---- deny by default -------------------------------------------------------------------------


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_default_deny_with_no_policies(action: str) -> None:
    decision = decide(PolicyEngine(), action)
    assert not decision.allowed
    assert decision.reasons == () and decision.errors == ()
    assert decision.explain() == "denied: no policy permits this (default deny)"


def test_default_deny_when_no_statement_is_about_the_request() -> None:
    engine = PolicyEngine({"other": 'permit(principal == Keygrants::Principal::"svc-other", '
                                    'action == Keygrants::Action::"decrypt", resource);'})
    assert not decide(engine, "encrypt").allowed
    assert not decide(engine, "decrypt").allowed
    assert decide(engine, "decrypt", principal=OTHER).allowed


def test_a_decision_has_no_truth_value() -> None:
    with pytest.raises(TypeError, match="allowed"):
        bool(decide(PolicyEngine()))


# ---- principals ------------------------------------------------------------------------------


def test_permit_by_principal_id() -> None:
    policy = ('permit(principal == Keygrants::Principal::"svc-billing", '
              'action == Keygrants::Action::"encrypt", resource);')
    assert allowed(policy)
    assert not allowed(policy, principal=OTHER)
    assert not allowed(policy, action="decrypt")


def test_permit_by_tag_group() -> None:
    policy = 'permit(principal in Keygrants::Group::"payments", action, resource);'
    assert allowed(policy)
    assert allowed(policy, principal=PrincipalFacts("svc-new", frozenset({"x", "payments"})))
    assert not allowed(policy, principal=OTHER)
    assert not allowed(policy, principal=PrincipalFacts("payments"))


def test_principal_attributes_in_conditions() -> None:
    assert allowed('permit(principal, action, resource) when { principal.tags.contains("payments") };')
    assert allowed('permit(principal, action, resource) when { principal.id like "svc-*" };')
    assert not allowed('permit(principal, action, resource) when { principal.id == "admin" };')


# ---- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("condition", [
    'resource == Keygrants::Key::"k-1"',
    'resource is Keygrants::Key) when { resource.aliases.contains("payments") }',
    'resource is Keygrants::Key) when { resource.tags.contains("pci") }',
    'resource is Keygrants::Key) when { resource.name like "payments-*" }',
    'resource is Keygrants::Key) when { resource.id == "k-1" && resource.state == "enabled" }',
    'resource is Keygrants::Key) when { resource.spec == "aes-256-gcm" && resource.tags.isEmpty() == false '
    '&& resource.purpose == "encrypt" && !(resource.tags.contains("web")) }',
])
def test_permit_on_keys_by_id_alias_tag_and_pattern(condition: str) -> None:
    if not condition.endswith("}"):
        condition += ")"
    policy = f"permit(principal, action == Keygrants::Action::\"decrypt\", {condition};"
    assert allowed(policy, action="decrypt")
    assert not allowed(policy, action="decrypt", key=OTHER_KEY)


def test_create_key_is_decided_on_the_requested_name() -> None:
    policy = ('permit(principal in Keygrants::Group::"payments", action == Keygrants::Action::"create_key", '
              'resource) when { resource.name like "payments-*" && resource.spec == "aes-256-gcm" };')
    provisional = KeyFacts(id="", name="payments-2025", spec="aes-256-gcm")
    assert allowed(policy, action="create_key", key=provisional)
    assert not allowed(policy, action="create_key", key=KeyFacts(id="", name="web-2025", spec="aes-256-gcm"))
    assert not allowed(policy, action="create_key", key=KeyFacts(id="", name="payments-x", spec="hmac"))


# ---- actions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("group", sorted(ACTION_GROUPS))
def test_action_groups_cover_exactly_their_members(group: str) -> None:
    engine = PolicyEngine({"g": f'permit(principal, action in Keygrants::Action::"{group}", resource);'})
    for action in ACTIONS:
        assert decide(engine, action).allowed == (action in ACTION_GROUPS[group]), (group, action)


def test_action_group_with_key_conditions_needs_a_key_scope() -> None:
    # "crypto" includes generate_random, whose resource is the Service: reading key attributes
    # on it is a schema error until the scope says `resource is Keygrants::Key`
    message = invalid('permit(principal, action in Keygrants::Action::"crypto", resource)\n'
                      '  when { resource.name like "payments-*" };')
    assert "Keygrants::Service" in message and "line 2:" in message
    policy = ('permit(principal, action in Keygrants::Action::"crypto", resource is Keygrants::Key)\n'
              '  when { resource.name like "payments-*" };')
    assert allowed(policy, action="sign")
    assert not allowed(policy, action="sign", key=OTHER_KEY)
    assert not allowed(policy, action="generate_random")


def test_action_list_scope() -> None:
    policy = ('permit(principal, action in [Keygrants::Action::"encrypt", Keygrants::Action::"read"], '
              'resource);')
    assert allowed(policy, action="encrypt")
    assert allowed(policy, action="describe_key")
    assert allowed(policy, action="list_keys")
    assert not allowed(policy, action="decrypt")


def test_read_group_does_not_include_the_audit_log() -> None:
    assert "read_audit" not in ACTION_GROUPS["read"]
    policy = 'permit(principal, action in Keygrants::Action::"read", resource);'
    assert not allowed(policy, action="read_audit")


# ---- context ---------------------------------------------------------------------------------


def test_encryption_context_key_and_value_conditions() -> None:
    value = 'permit(principal, action, resource) when { context.encryption_context.contains("tenant=42") };'
    assert allowed(value, req=request(context={"tenant": "42", "app": "x"}))
    assert not allowed(value, req=request(context={"tenant": "43"}))
    assert not allowed(value, req=request())
    keys = ('permit(principal, action, resource) when '
            '{ context.encryption_context_keys.containsAll(["tenant", "app"]) };')
    assert allowed(keys, req=request(context={"tenant": "1", "app": "2"}))
    assert not allowed(keys, req=request(context={"tenant": "1"}))


def test_encryption_context_pairs_are_unambiguous() -> None:
    # "a"="b=c" and "a=b"="c" must not both read as "a=b=c": keys holding "=" are escaped
    policy = 'permit(principal, action, resource) when { context.encryption_context.contains("a=b=c") };'
    assert allowed(policy, req=request(context={"a": "b=c"}))
    assert not allowed(policy, req=request(context={"a=b": "c"}))
    escaped = 'permit(principal, action, resource) when { context.encryption_context.contains("a%3Db=c") };'
    assert allowed(escaped, req=request(context={"a=b": "c"}))
    keys = 'permit(principal, action, resource) when { context.encryption_context_keys.contains("a=b") };'
    assert allowed(keys, req=request(context={"a=b": "c"}))


def test_time_window() -> None:
    policy = 'permit(principal, action, resource) when { context.hour >= 9 && context.hour < 17 };'
    assert allowed(policy, req=request(now=MONDAY_10H))
    assert allowed(policy, req=request(now=MONDAY_10H - HOUR))  # 09:00:00
    assert not allowed(policy, req=request(now=MONDAY_10H - HOUR - 1))  # 08:59:59
    assert not allowed(policy, req=request(now=MONDAY_10H + 7 * HOUR))  # 17:00:00
    weekdays = 'permit(principal, action, resource) when { context.weekday < 5 };'
    assert allowed(weekdays, req=request(now=MONDAY_10H + 4 * DAY))  # Friday
    assert not allowed(weekdays, req=request(now=MONDAY_10H + 5 * DAY))  # Saturday
    assert not allowed(weekdays, req=request(now=MONDAY_10H - DAY))  # Sunday
    expiry = 'permit(principal, action, resource) when { context.now < 1704153600 };'
    assert allowed(expiry)
    assert not allowed(expiry, req=request(now=1_704_153_600))


def test_source_condition() -> None:
    policy = 'permit(principal, action, resource) when { context.source == "mtls" };'
    assert allowed(policy, req=request(source="mtls"))
    for source in ("signature", "api_key", "admin_token"):
        assert not allowed(policy, req=request(source=source))


GRANT_POLICY = """\
permit(principal in Keygrants::Group::"payments", action == Keygrants::Action::"create_grant", resource)
when {
  context has grant &&
  context.grant.ttl <= 300 && context.grant.uses <= 10 && context.grant.uses > 0 && context.grant.pop &&
  ["decrypt", "encrypt"].containsAll(context.grant.operations) &&
  context.grant.audiences.contains("svc-ledger")
};
"""


@pytest.mark.parametrize(("grant", "ok"), [
    (GrantFacts(ttl=300, uses=10, pop=True, operations=frozenset({"decrypt"}),
                audiences=frozenset({"svc-ledger"})), True),
    (GrantFacts(ttl=301, uses=10, pop=True, operations=frozenset({"decrypt"}),
                audiences=frozenset({"svc-ledger"})), False),
    (GrantFacts(ttl=60, uses=11, pop=True, operations=frozenset({"decrypt"}),
                audiences=frozenset({"svc-ledger"})), False),
    # uses 0 means unlimited: "uses <= 10" alone would let it through
    (GrantFacts(ttl=60, uses=0, pop=True, operations=frozenset({"decrypt"}),
                audiences=frozenset({"svc-ledger"})), False),
    (GrantFacts(ttl=60, uses=1, pop=False, operations=frozenset({"decrypt"}),
                audiences=frozenset({"svc-ledger"})), False),
    (GrantFacts(ttl=60, uses=1, pop=True, operations=frozenset({"decrypt", "sign"}),
                audiences=frozenset({"svc-ledger"})), False),
    (GrantFacts(ttl=60, uses=1, pop=True, operations=frozenset({"decrypt"}),
                audiences=frozenset({"svc-web"})), False),
    (None, False),
])
def test_grant_limits(grant: GrantFacts | None, ok: bool) -> None:
    assert allowed(GRANT_POLICY, action="create_grant", req=request(grant=grant)) is ok


def test_the_team_lead_example_in_the_docs_confines_grants_as_its_text_says() -> None:
    # It read ["svc-ledger"].containsAll(audiences), true of no audience at all, and left the
    # grantee free: a lead could hand any principal a token for the KMS itself.
    text = DOCS.read_text(encoding="utf-8")
    policy = re.search(r'```cedar\n(permit \(\n  principal in Keygrants::Group::"payments-leads".*?)```',
                       text, re.DOTALL)
    assert policy is not None
    lead = PrincipalFacts("lead-1", frozenset({"payments-leads"}))
    good = GrantFacts(ttl=300, uses=5, pop=True, operations=frozenset({"decrypt"}),
                      grantee="svc-ledger")
    for grant, ok in [(good, True), (dataclasses.replace(good, grantee="svc-other"), False),
                      (dataclasses.replace(good, audiences=frozenset({"svc-web"})), False),
                      (dataclasses.replace(good, uses=0), False),
                      (dataclasses.replace(good, operations=frozenset({"encrypt"})), False)]:
        assert allowed(policy.group(1), action="create_grant", principal=lead,
                       req=request(grant=grant)) is ok, grant


def test_reading_the_optional_grant_without_has_is_refused() -> None:
    message = invalid('permit(principal, action, resource) when { context.grant.ttl <= 300 };')
    assert "context has grant" in message and "line 1:" in message


# ---- forbid, explain -------------------------------------------------------------------------


def test_forbid_overrides_permit_and_explain() -> None:
    engine = PolicyEngine({
        "billing": '// billing keys\n\n'
                   'permit(principal in Keygrants::Group::"payments", action, resource);\n',
        "ops": ('permit(principal, action == Keygrants::Action::"describe_key", resource);\n'
                '\n@id("no deletes")\nforbid(principal, action == Keygrants::Action::"schedule_key_deletion",'
                ' resource);\n'),
    })
    allow = decide(engine, "encrypt")
    assert allow.allowed and allow.reasons == ("billing#1",)
    assert allow.explain() == "allowed by billing#1 (line 3)"
    both = decide(engine, "describe_key")
    assert both.reasons == ("billing#1", "ops#1")
    assert both.explain() == "allowed by billing#1 (line 3), ops#1 (line 1)"
    deny = decide(engine, "schedule_key_deletion")
    assert not deny.allowed and deny.reasons == ("ops#2",)
    assert deny.explain() == 'denied by forbid statement ops#2 (line 3) @id("no deletes")'
    assert deny.statements[0].label == "no deletes" and deny.statements[0].effect == "forbid"
    default = decide(engine, "encrypt", principal=OTHER)
    assert default.explain() == "denied: no policy permits this (default deny)"


def test_a_forbid_that_fails_to_evaluate_denies() -> None:
    # Cedar skips an erroring statement; for a forbid that would turn an error into an allow
    engine = PolicyEngine({"p": f"{ANYTHING}\nforbid(principal, action, resource) when {{ {OVERFLOW} }};"})
    decision = decide(engine)
    assert not decision.allowed
    assert decision.reasons == ("p#2",)
    assert decision.errors and decision.errors[0].startswith("p#2: ") and "overflow" in decision.errors[0]
    assert decision.explain().startswith("denied by forbid statement p#2 (line 2); 1 statement failed")


def test_a_permit_that_fails_to_evaluate_does_not_allow() -> None:
    engine = PolicyEngine({"p": f"permit(principal, action, resource) when {{ {OVERFLOW} }};"})
    decision = decide(engine)
    assert not decision.allowed and decision.reasons == ()
    assert decision.errors[0].startswith("p#1: ")
    assert "fail closed" in decision.explain()
    other = PolicyEngine({"p": f"{ANYTHING}\npermit(principal, action, resource) when {{ {OVERFLOW} }};"})
    assert decide(other).allowed and decide(other).reasons == ("p#1",)


def test_user_id_annotations_label_but_do_not_rename() -> None:
    engine = PolicyEngine({"p": '@id("p#2")\npermit(principal, action, resource);'})
    decision = decide(engine)
    assert decision.reasons == ("p#1",)
    assert decision.statements[0].label == "p#2"


# ---- validation ------------------------------------------------------------------------------


def test_validate_returns_the_statement_count() -> None:
    assert PolicyEngine.validate("p", "") == 0
    assert PolicyEngine.validate("p", "// nothing yet\n") == 0
    assert PolicyEngine.validate("p", "permit(principal, action, resource);\n" * 3) == 3


@pytest.mark.parametrize(("text", "where", "what"), [
    ("permit(principal, action, resource)\n  when { 1 + };", "t#1 at line 2:14", "unexpected token `}`"),
    (f"{ANYTHING}\npermit(principal, action, resource)\n  when {{ 1 + }} when {{ true }};",
     "t#2 at line 3:14", "unexpected token `}`"),
    ("permit(principal, action, resource)", "t#1 at line 1:36", "unexpected end of input"),
    ('permit(principal, action, resource) when { "abc };', "t#1 at line 1:44", "invalid token"),
    ("permit(?principal, action, resource);", "t#1 at line 1:8", "?principal"),
    ('permit(principal == "svc", action, resource);', "t#1 at line 1:21", "entity uid"),
    ("permit(principal, action, resource) when { nosuchfn(1) };", "t#1 at line 1:44", "nosuchfn"),
    ('// a ";" in a comment\npermit(principal, action, resource) when { ";" == ";" };\n'
     "forbid(principal, action, resource) when { $ };", "t#2 at line 3:44", "invalid token"),
    ("permitt(principal, action, resource);", "t#1 at line 1:1", "effect"),
])
def test_syntax_errors_give_statement_and_line_column(text: str, where: str, what: str) -> None:
    message = invalid(text)
    assert message.startswith(where + ": "), message
    assert what in message
    assert re.search(r"line \d+:\d+", message)


@pytest.mark.parametrize(("text", "where", "what"), [
    ('permit(principal, action, resource is Keygrants::Key)\n  when { resource.colour == "red" };',
     "t#1 at line 2:19", "attribute `colour`"),
    ("permit(principal is Keygrants::User, action, resource);", "t#1 at line 1:21",
     "unrecognized entity type `Keygrants::User`"),
    ('permit(principal, action == Keygrants::Action::"launch", resource);', "t#1 at line 1:29",
     'unrecognized action `Keygrants::Action::"launch"`'),
    (f'{ANYTHING}\n\nforbid(principal, action, resource) when {{ context.region == "eu" }};',
     "t#2 at line 3:", "attribute `region`"),
    ('permit(principal, action, resource) when { context.hour == "9" };', "t#1 at line 1:", ""),
    ('permit(principal, action == Keygrants::Action::"crypto", resource);', "t#1 at line 1:1",
     "applicable action"),
])
def test_schema_errors_give_statement_and_line_column(text: str, where: str, what: str) -> None:
    message = invalid(text)
    assert message.startswith(where), message
    assert what in message


def test_templates_are_refused() -> None:
    message = invalid(f"{ANYTHING}\npermit(principal == ?principal, action, resource);")
    assert "template" in message and message.startswith("t#2 at line 2:1")


@pytest.mark.parametrize("name", ["", "a" * 129, "a b", "a/b", "é", "a\n", "../x", "x;y"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(PolicyInvalid, match="policy name"):
        PolicyEngine.validate(name, "permit(principal, action, resource);")
    with pytest.raises(PolicyInvalid):
        PolicyEngine({name: "permit(principal, action, resource);"})


@pytest.mark.parametrize("name", ["a", "A-z_0.9", "x" * 128])
def test_good_names_are_accepted(name: str) -> None:
    assert PolicyEngine.validate(name, "permit(principal, action, resource);") == 1


def test_oversize_texts_are_refused() -> None:
    pad = "// " + "x" * (MAX_POLICY_BYTES - 100) + "\n"
    assert PolicyEngine.validate("p", pad + "permit(principal, action, resource);") == 1
    with pytest.raises(PolicyInvalid, match="larger than"):
        PolicyEngine.validate("p", pad + "// " + "y" * 100 + "\npermit(principal, action, resource);")
    statement = "permit(principal, action, resource);\n"
    assert PolicyEngine.validate("p", statement * MAX_STATEMENTS_PER_POLICY) == MAX_STATEMENTS_PER_POLICY
    with pytest.raises(PolicyInvalid, match="statements"):
        PolicyEngine.validate("p", statement * (MAX_STATEMENTS_PER_POLICY + 1))


@pytest.mark.parametrize(("expression", "what"), [
    ("(" * 2000 + "true" + ")" * 2000, "brackets"),
    ("[" * 700 + "]" * 700 + " == []", "brackets"),
    (" && ".join(["true"] * 3000), "operators"),
    ("1" + " + 1" * 10000 + " > 0", "operators"),
    ("context" + ".a" * 20000 + " == 1", "operators"),
    ("if true then " * 2000 + "true" + " else false" * 2000, "operators"),
])
def test_deep_nesting_is_refused_before_cedar_sees_it(expression: str, what: str) -> None:
    # Cedar overflows its stack (a crash, not an exception) on input nested this deep
    message = invalid(f"{ANYTHING}\npermit(principal, action, resource) when {{ {expression} }};")
    assert message.startswith("t#2 at line 2:") and what in message


def test_nesting_within_the_limits_is_fine() -> None:
    # the braces of `when { }` are the first level
    depth = "(" * (MAX_NESTING - 1) + "true" + ")" * (MAX_NESTING - 1)
    chain = " && ".join(["context.hour > 1"] * (MAX_OPERATORS_PER_STATEMENT // 3))
    assert PolicyEngine.validate("p", f"permit(principal, action, resource) when {{ {depth} }};") == 1
    assert PolicyEngine.validate("p", f"permit(principal, action, resource) when {{ {chain} }};") == 1
    many = ", ".join(f'"t{i}"' for i in range(5000))
    assert PolicyEngine.validate("p", f"permit(principal, action, resource) when "
                                      f"{{ [{many}].contains(context.source) }};") == 1


def test_text_that_is_not_unicode_is_refused() -> None:
    with pytest.raises(PolicyInvalid, match="Unicode"):
        PolicyEngine.validate("p", 'permit(principal, action, resource) when { "\ud800" == "" };')


def test_policy_count_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "MAX_POLICIES", 2)
    text = "permit(principal, action, resource);"
    with pytest.raises(PolicyInvalid, match="too many policies"):
        PolicyEngine({"a": text, "b": text, "c": text})
    engine = PolicyEngine({"a": text, "b": text})
    with pytest.raises(PolicyInvalid, match="too many policies"):
        engine.with_policy("c", text)
    assert engine.with_policy("b", text + text).statement_count == 3


def test_total_statements_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "MAX_TOTAL_STATEMENTS", 3)
    text = "permit(principal, action, resource);\n" * 2
    engine = PolicyEngine({"a": text})
    with pytest.raises(PolicyInvalid, match="too many statements"):
        engine.with_policy("b", text)


@pytest.mark.parametrize(("name", "text"), [(1, "permit(principal, action, resource);"), ("p", b"permit")])
def test_wrong_types_are_type_errors(name: object, text: object) -> None:
    with pytest.raises(TypeError):
        PolicyEngine.validate(name, text)  # type: ignore[arg-type]


# ---- engine lifecycle ------------------------------------------------------------------------


def test_with_policy_leaves_the_old_engine_unchanged() -> None:
    old = PolicyEngine({"a": 'permit(principal, action == Keygrants::Action::"encrypt", resource);'})
    assert decide(old).allowed
    new = old.with_policy("b", 'forbid(principal, action, resource) when { context.source == "mtls" };')
    assert not decide(new).allowed and decide(new).reasons == ("b#1",)
    assert decide(old).allowed
    assert old.policy_names() == ("a",) and new.policy_names() == ("a", "b")
    replaced = new.with_policy("a", 'permit(principal, action == Keygrants::Action::"decrypt", resource);')
    assert not decide(replaced, "encrypt", req=request(source="signature")).allowed
    assert decide(replaced, "decrypt", req=request(source="signature")).allowed
    removed = new.without_policy("b")
    assert decide(removed).allowed and "b" not in removed and "b" in new
    with pytest.raises(PolicyNotFound):
        removed.without_policy("b")


def test_a_refused_policy_leaves_the_engine_serving() -> None:
    engine = PolicyEngine({"a": "permit(principal, action, resource);"})
    with pytest.raises(PolicyInvalid):
        engine.with_policy("a", "permit(principal, action, resource")
    assert decide(engine).allowed and engine.statements("a")[0].ref == "a#1"


def test_introspection() -> None:
    engine = PolicyEngine({"b": "permit(principal, action, resource);\n" * 2,
                           "a": "\n  forbid(principal, action, resource) when { false };"})
    assert engine.policy_names() == ("a", "b")
    assert engine.statement_count == 3 and len(engine) == 2
    (statement,) = engine.statements("a")
    assert (statement.ref, statement.effect, statement.line, statement.column) == ("a#1", "forbid", 2, 3)
    with pytest.raises(PolicyNotFound):
        engine.statements("c")
    assert "2 policies" in repr(engine)


# ---- misuse ----------------------------------------------------------------------------------


def test_unknown_action_is_a_value_error() -> None:
    engine = PolicyEngine({"a": "permit(principal, action, resource);"})
    for action in ("launch", "crypto", "Encrypt", ""):
        with pytest.raises(ValueError, match="unknown action"):
            engine.decide(BILLING, action, PAYMENTS_KEY, request())


def test_resource_of_the_wrong_kind_is_a_value_error() -> None:
    engine = PolicyEngine()
    with pytest.raises(ValueError, match="KeyFacts"):
        engine.decide(BILLING, "encrypt", None, request())
    with pytest.raises(ValueError, match="resource=None"):
        engine.decide(BILLING, "list_keys", PAYMENTS_KEY, request())
    with pytest.raises(ValueError, match="resource=None"):
        engine.decide(BILLING, "list_principals", OTHER, request())
    with pytest.raises(ValueError, match="PrincipalFacts"):
        engine.decide(BILLING, "manage_credentials", None, request())
    with pytest.raises(ValueError, match="PrincipalFacts"):
        engine.decide(BILLING, "update_principal", PAYMENTS_KEY, request())
    with pytest.raises(ValueError, match="KeyFacts"):
        engine.decide(BILLING, "encrypt", OTHER, request())
    # one uid is one entity: the caller as a resource must be the caller's own facts
    with pytest.raises(ValueError, match="caller"):
        engine.decide(BILLING, "update_principal", PrincipalFacts("svc-billing"), request())
    with pytest.raises(TypeError):
        engine.decide("svc-billing", "list_keys", None, request())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        engine.decide(BILLING, "list_keys", None, {"source": "mtls"})  # type: ignore[arg-type]


def test_facts_are_checked() -> None:
    with pytest.raises(ValueError, match="source"):
        RequestFacts(source="cookie", now=1)
    with pytest.raises(TypeError):
        RequestFacts(source="mtls", now=True)
    with pytest.raises(ValueError):
        RequestFacts(source="mtls", now=-1)
    with pytest.raises(TypeError):
        RequestFacts(source="mtls", now=1, encryption_context={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        PrincipalFacts("p", "payments")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PrincipalFacts("")
    with pytest.raises(ValueError):
        GrantFacts(ttl=-1, uses=1)
    with pytest.raises(TypeError):
        GrantFacts(ttl=1, uses=1, pop=1)  # type: ignore[arg-type]
    assert PrincipalFacts("p", {"a"}).tags == frozenset({"a"})  # type: ignore[arg-type]


def test_request_facts_keep_their_own_copy_of_the_context() -> None:
    context = {"tenant": "42"}
    facts = request(context=context)
    context["tenant"] = "43"
    policy = 'permit(principal, action, resource) when { context.encryption_context.contains("tenant=42") };'
    assert allowed(policy, req=facts)


# ---- injection -------------------------------------------------------------------------------


@pytest.mark.parametrize("evil", [
    'svc-billing" || true || "',
    'svc-billing"), action, resource); permit(principal',
    "svc-billing\n",
    "svc-billing\u0000",
    "svc-bïlling",
    "svc-billing\\",
])
def test_user_data_cannot_break_out(evil: str) -> None:
    engine = PolicyEngine({"p": 'permit(principal == Keygrants::Principal::"svc-billing", action, '
                                'resource);\npermit(principal in Keygrants::Group::"payments", action, '
                                'resource is Keygrants::Key) when { resource.name == "payments-main" };'})
    principal = PrincipalFacts(evil, frozenset({evil, 'payments"'}))
    key = KeyFacts(id=evil, name=evil, aliases=frozenset({evil}), spec=evil, purpose=evil, state=evil,
                   tags=frozenset({evil}))
    context = {evil: evil, "k": evil}
    assert not decide(engine, principal=principal, key=key, req=request(context=context)).allowed
    assert not decide(engine, "list_keys", principal=principal, req=request(context=context)).allowed
    # the same odd strings still match exactly where a policy names them
    if "\u0000" in evil or "\n" in evil:
        return  # not writable as a Cedar string literal; nothing for a policy to name
    literal = json.dumps(evil, ensure_ascii=False)
    named = PolicyEngine({"p": f"permit(principal == Keygrants::Principal::{literal}, action, "
                               f"resource is Keygrants::Key) when {{ resource.name == {literal} }};"})
    assert decide(named, principal=principal, key=key).allowed
    assert not decide(named, key=key).allowed


def test_unicode_and_quotes_in_names_and_tags_match_exactly() -> None:
    tag = 'päy"ments'
    principal = PrincipalFacts("svc-ü", frozenset({tag}))
    engine = PolicyEngine({"p": 'permit(principal in Keygrants::Group::"päy\\"ments", action, resource);'})
    assert decide(engine, principal=principal).allowed
    assert not decide(engine, principal=PrincipalFacts("svc-ü", frozenset({"päy"}))).allowed


# ---- principal-scoped actions -----------------------------------------------------------------

HELPDESK_POLICY = """\
permit(principal in Keygrants::Group::"helpdesk",
       action == Keygrants::Action::"manage_credentials",
       resource in Keygrants::Group::"team-a");
"""
SELF_SERVICE = """\
permit(principal, action == Keygrants::Action::"manage_credentials", resource)
  when { resource == principal };
"""


def test_principal_actions_are_decided_on_the_target_principal() -> None:
    engine = PolicyEngine({"helpdesk": HELPDESK_POLICY})
    assert decide(engine, "manage_credentials", HELPDESK, target=TEAM_A_MEMBER).allowed
    assert not decide(engine, "manage_credentials", HELPDESK, target=TEAM_B_MEMBER).allowed
    assert not decide(engine, "manage_credentials", OTHER, target=TEAM_A_MEMBER).allowed
    assert not decide(engine, "update_principal", HELPDESK, target=TEAM_A_MEMBER).allowed


def test_self_service_credentials() -> None:
    engine = PolicyEngine({"self": SELF_SERVICE})
    assert decide(engine, "manage_credentials", TEAM_A_MEMBER, target=TEAM_A_MEMBER).allowed
    assert not decide(engine, "manage_credentials", TEAM_A_MEMBER, target=TEAM_B_MEMBER).allowed
    assert not decide(engine, "describe_principal", TEAM_A_MEMBER, target=TEAM_A_MEMBER).allowed


@pytest.mark.parametrize(("condition", "target", "ok"), [
    ('resource.tags.contains("team-a")', TEAM_A_MEMBER, True),
    ('resource.tags.contains("team-a")', TEAM_B_MEMBER, False),
    ('resource in Keygrants::Group::"team-a"', TEAM_A_MEMBER, True),
    ('resource in Keygrants::Group::"team-a"', TEAM_B_MEMBER, False),
    ('resource.id like "ali*"', TEAM_A_MEMBER, True),
    ('resource.id like "ali*"', TEAM_B_MEMBER, False),
    ('["team-a", "team-c"].containsAll(resource.tags)', TEAM_A_MEMBER, True),
    ('["team-a", "team-c"].containsAll(resource.tags)',
     PrincipalFacts("alice", frozenset({"team-a", "admins"})), False),
    ('resource != principal && principal.tags.contains("helpdesk")', TEAM_A_MEMBER, True),
    ('resource != principal && principal.tags.contains("helpdesk")', HELPDESK, False),
])
def test_conditions_on_the_target_principal(condition: str, target: PrincipalFacts, ok: bool) -> None:
    policy = (f'permit(principal, action in Keygrants::Action::"principal_admin", '
              f'resource is Keygrants::Principal) when {{ {condition} }};')
    for action in ("describe_principal", "update_principal", "delete_principal",
                   "manage_credentials", "create_principal"):
        assert allowed(policy, action=action, principal=HELPDESK, target=target) is ok, action


def test_the_caller_as_resource_carries_what_either_role_reads() -> None:
    # principal reads id, resource reads tags: the one entity must have both
    engine = PolicyEngine({"p": 'permit(principal, action == Keygrants::Action::"update_principal", '
                                'resource) when { principal.id == "alice" && '
                                'resource.tags.contains("team-a") };'})
    assert decide(engine, "update_principal", TEAM_A_MEMBER, target=TEAM_A_MEMBER).allowed
    assert decide(engine, "update_principal", TEAM_A_MEMBER,
                  target=PrincipalFacts("carol", frozenset({"team-a"}))).allowed
    assert not decide(engine, "update_principal", TEAM_A_MEMBER, target=TEAM_B_MEMBER).allowed


def test_list_principals_stays_service_scoped() -> None:
    assert ACTIONS["list_principals"] == "service"
    for action in ACTION_GROUPS["principal_admin"] - {"list_principals"}:
        assert ACTIONS[action] == "principal"
    with pytest.raises(PolicyInvalid):
        PolicyEngine.validate("p", 'permit(principal, action == Keygrants::Action::"list_principals", '
                                   'resource) when { resource.tags.contains("x") };')


# ---- schema and public surface ---------------------------------------------------------------


def test_schema_matches_the_action_tables() -> None:
    schema = cedarpy.Schema.from_str(SCHEMA)
    base = json.loads(str(cedarpy.Entities.from_json_str("[]", schema)))
    parents = {e["uid"]["id"]: {p["id"] for p in e["parents"]} for e in base}
    assert set(parents) == set(ACTIONS) | set(ACTION_GROUPS)
    for action in ACTIONS:
        assert parents[action] == {g for g, members in ACTION_GROUPS.items() if action in members}
    for members in ACTION_GROUPS.values():
        assert members <= set(ACTIONS)
    assert SERVICE_ID == "keygrants"


def test_every_action_belongs_to_a_group() -> None:
    grouped = set().union(*ACTION_GROUPS.values())
    assert grouped == set(ACTIONS)


def test_public_all_is_sorted_and_resolves() -> None:
    import keygrants.policy as policy

    def isort_style(name: str) -> tuple[int, str]:
        if name.isupper() or (name.upper() == name and "_" in name):
            return (0, name)
        return (1, name) if name[:1].isupper() else (2, name)

    assert list(policy.__all__) == sorted(policy.__all__, key=isort_style)
    for attr in policy.__all__:
        assert hasattr(policy, attr)


# ---- slicing is invisible --------------------------------------------------------------------

EQUIVALENCE_POLICIES = {
    "team": '\n'.join(
        f'permit(principal in Keygrants::Group::"team{i}", action in Keygrants::Action::"crypto", '
        f'resource is Keygrants::Key) when {{ resource.name like "team{i}-*" }};'
        for i in range(4)),
    "named": 'permit(principal == Keygrants::Principal::"svc-1", action, resource);\n'
             'permit(principal in Keygrants::Principal::"svc-2", action == Keygrants::Action::"decrypt", '
             'resource);\n'
             'permit(principal is Keygrants::Principal in Keygrants::Group::"team2", '
             'action in [Keygrants::Action::"read", Keygrants::Action::"grants"], resource);',
    "guards": 'forbid(principal, action in Keygrants::Action::"crypto", resource) '
              'unless { context.source == "mtls" || context.source == "signature" };\n'
              'forbid(principal, action, resource is Keygrants::Key) when { resource.state == "disabled" };\n'
              'forbid(principal in Keygrants::Group::"team3", action, resource) when { context.hour < 6 };\n'
              'permit(principal, action == Keygrants::Action::"create_grant", resource) '
              'when { context has grant && context.grant.ttl <= 60 };\n'
              'permit(principal, action, resource) when { action == Keygrants::Action::"list_keys" };\n'
              'permit(principal, action, resource) when { action in Keygrants::Action::"audit" && '
              'principal.tags.contains("team1") };',
    # entities reached other than through the request: an action named as a literal, an
    # attribute of a computed entity, attribute presence
    "reach": 'forbid(principal, action, resource) when { Keygrants::Action::"decrypt" in '
             'Keygrants::Action::"crypto" && action == Keygrants::Action::"list_keys" && '
             'context.source == "api_key" };\n'
             'permit(principal, action == Keygrants::Action::"describe_key", resource) when { '
             '(if context.source == "mtls" then principal else principal).id like "svc-1*" };\n'
             'permit(principal, action == Keygrants::Action::"rotate_key", resource is Keygrants::Key) '
             'when { resource has aliases && resource.name like "team1-*" };',
    # principal-scoped actions: the target principal's tags, groups, id and identity
    "principals": 'permit(principal in Keygrants::Group::"team0", '
                  'action == Keygrants::Action::"manage_credentials", '
                  'resource in Keygrants::Group::"team1");\n'
                  'permit(principal, action == Keygrants::Action::"manage_credentials", resource) '
                  'when { resource == principal };\n'
                  'permit(principal, action in Keygrants::Action::"principal_admin", '
                  'resource is Keygrants::Principal) when { principal.tags.contains("team2") && '
                  'resource.tags.contains("team3") };\n'
                  'forbid(principal, action == Keygrants::Action::"delete_principal", '
                  'resource is Keygrants::Principal) when { resource.id like "svc-4*" };\n'
                  'permit(principal == Keygrants::Principal::"svc-3", '
                  'action == Keygrants::Action::"update_principal", resource) '
                  'when { resource is Keygrants::Principal && resource.id != principal.id };',
}


def test_slicing_and_context_pruning_match_cedar_on_the_whole_set() -> None:
    """Every decision equals the one cedarpy makes on all statements with the full context."""
    engine = PolicyEngine(EQUIVALENCE_POLICIES)
    whole: dict[str, object] = {}
    for name, text in EQUIVALENCE_POLICIES.items():
        doc = json.loads(cedarpy.policies_to_json_str(text))
        for i in range(len(doc["staticPolicies"])):
            whole[f"{name}#{i + 1}"] = doc["staticPolicies"][f"policy{i}"]
    reference = cedarpy.PolicySet.from_json_str(
        json.dumps({"staticPolicies": whole, "templates": {}, "templateLinks": []}))
    schema = cedarpy.Schema.from_str(SCHEMA)
    rng = random.Random(7)
    checked = principal_checked = 0
    focus = ["describe_key", "rotate_key", "list_keys", "decrypt", "create_grant", "read_audit",
             "manage_credentials", "update_principal", "delete_principal", "create_principal"]
    for _ in range(600):
        tags = rng.sample(["team0", "team1", "team2", "team3"], rng.randrange(3))
        principal = PrincipalFacts(f"svc-{rng.randrange(5)}", frozenset(tags))
        action = rng.choice(sorted(ACTIONS) if rng.random() < 0.5 else focus)
        key = KeyFacts(id=f"k{rng.randrange(3)}", name=f"team{rng.randrange(5)}-x",
                       state=rng.choice(["enabled", "disabled"]))
        grant = GrantFacts(ttl=rng.choice([30, 120]), uses=1) if rng.random() < 0.5 else None
        req = RequestFacts(source=rng.choice(["mtls", "api_key"]), now=MONDAY_10H + rng.randrange(DAY),
                           encryption_context={"t": "1"}, grant=grant)
        kind = ACTIONS[action]
        target = principal
        if rng.random() < 0.7:  # else the caller itself
            target = PrincipalFacts(f"svc-{rng.randrange(5)}",
                                    frozenset(rng.sample(["team0", "team1", "team2", "team3"],
                                                         rng.randrange(3))))
            if target.id == principal.id:
                target = principal
        resource = key if kind == "key" else target if kind == "principal" else None
        got = engine.decide(principal, action, resource, req)

        entities = [{"uid": {"type": "Keygrants::Principal", "id": principal.id},
                     "attrs": {"id": principal.id, "tags": sorted(principal.tags)},
                     "parents": [{"type": "Keygrants::Group", "id": t} for t in principal.tags]},
                    {"uid": {"type": "Keygrants::Service", "id": "keygrants"}, "attrs": {}, "parents": []}]
        if kind == "principal" and target != principal:
            entities.append({"uid": {"type": "Keygrants::Principal", "id": target.id},
                             "attrs": {"id": target.id, "tags": sorted(target.tags)},
                             "parents": [{"type": "Keygrants::Group", "id": t} for t in target.tags]})
        if kind == "key":
            entities.append({"uid": {"type": "Keygrants::Key", "id": key.id},
                             "attrs": {"id": key.id, "name": key.name, "aliases": [], "spec": "",
                                       "purpose": "", "state": key.state, "tags": []},
                             "parents": []})
        now = req.now
        context: dict[str, object] = {
            "source": req.source, "now": now, "hour": now // 3600 % 24, "weekday": (now // 86400 + 3) % 7,
            "encryption_context": ["t=1"], "encryption_context_keys": ["t"]}
        if grant is not None:
            context["grant"] = {"ttl": grant.ttl, "uses": grant.uses, "pop": grant.pop,
                                "operations": [], "audiences": [], "grantee": ""}
        want = cedarpy.is_authorized(
            {"principal": {"type": "Keygrants::Principal", "id": principal.id},
             "action": {"type": "Keygrants::Action", "id": action},
             "resource": ({"type": "Keygrants::Key", "id": key.id} if kind == "key"
                          else {"type": "Keygrants::Principal", "id": target.id}
                          if kind == "principal"
                          else {"type": "Keygrants::Service", "id": "keygrants"}),
             "context": context},
            reference, json.dumps(entities), schema=schema)
        assert want.diagnostics.errors == [] and got.errors == ()
        assert got.allowed == want.allowed, (principal, action, key, req)
        assert set(got.reasons) == set(want.diagnostics.reasons), (principal, action, key, req)
        checked += got.allowed
        principal_checked += got.allowed and kind == "principal"
    assert checked > 20, "the sample should allow some requests"
    assert principal_checked > 5, "and some on principals"


def test_cached_entities_follow_the_facts() -> None:
    engine = PolicyEngine({"p": 'permit(principal, action, resource is Keygrants::Key) when '
                                '{ resource.state == "enabled" && principal.tags.contains("payments") };'})
    assert decide(engine).allowed
    disabled = KeyFacts(id="k-1", name="payments-main", aliases=frozenset({"payments"}),
                        spec="aes-256-gcm", purpose="encrypt", state="disabled", tags=frozenset({"pci"}))
    assert not decide(engine, key=disabled).allowed
    assert not decide(engine, principal=PrincipalFacts("svc-billing")).allowed
    derived = engine.with_policy("q", "forbid(principal, action, resource) when { false };")
    assert decide(derived).allowed and not decide(derived, key=disabled).allowed


def test_cached_entities_follow_the_target_principal() -> None:
    engine = PolicyEngine({"p": HELPDESK_POLICY})
    assert decide(engine, "manage_credentials", HELPDESK, target=TEAM_A_MEMBER).allowed
    retagged = PrincipalFacts("alice", frozenset({"team-b"}))
    assert not decide(engine, "manage_credentials", HELPDESK, target=retagged).allowed
    assert decide(engine, "manage_credentials", HELPDESK, target=TEAM_A_MEMBER).allowed
    # a key and a principal resource with the same id are different entities
    key = KeyFacts(id="alice", name="alice")
    assert not engine.decide(HELPDESK, "describe_key", key, request()).allowed


# ---- the user documentation ------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "policy.md"


def test_docs_carry_the_current_schema() -> None:
    assert SCHEMA.strip() in DOCS.read_text(encoding="utf-8")


@pytest.mark.parametrize(("doc", "at_least"), [(DOCS, 8), (DOCS.parent / "grants.md", 2)],
                         ids=["policy.md", "grants.md"])
def test_every_policy_example_in_the_docs_validates(doc, at_least: int) -> None:
    blocks = re.findall(r"```cedar\n(.*?)```", doc.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) >= at_least
    for i, block in enumerate(blocks):
        assert PolicyEngine.validate(f"doc-{i}", block) >= 1, block
