"""The OpenAPI document says enough to generate a working client: every query parameter a
handler reads, the headers that matter, every status with its body, optional bodies, value
limits and date-time formats; checked against the endpoint table and against the live app."""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

from keygrants import models as m
from keygrants.api import app as app_module
from keygrants.api.app import ENDPOINTS, Endpoint
from keygrants.api.openapi import openapi_document

from .conftest import ADMIN, BREAK_GLASS_POLICY, World
from .test_http import assert_error, case_for, send

pytestmark = pytest.mark.anyio

DOC = openapi_document(ENDPOINTS)
OPS = {e.operation_id: DOC["paths"][e.path][e.method.lower()] for e in ENDPOINTS}
BY_ID = {e.operation_id: e for e in ENDPOINTS}
COMPONENTS = DOC["components"]

# What each handler reads, written out here independently of the endpoint table:
# {operationId: {parameter: required}}.
EXPECTED_QUERY: dict[str, dict[str, bool]] = {
    "listKeys": {"limit": False, "after": False},
    "getPublicKey": {"version": False},
    "listAliases": {"key": False},
    "auditSearch": {p: False for p in ("principal", "key", "grant", "type", "since", "until",
                                       "after", "limit")},
    "auditInclusionProof": {"index": True, "size": False},
    "auditConsistencyProof": {"old": True, "new": False},
    "auditExport": {"since": False},
    "listPrincipals": {"limit": False, "after": False},
    "listGrants": {p: False for p in ("key", "grantee", "retiring_principal", "state", "limit",
                                      "after")},
    "revocations": {"since": False, "limit": False},
}


def resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        kind, name = node["$ref"].split("/")[-2:]
        node = COMPONENTS[kind][name]
    return node


def query_params(op_id: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in map(resolve, OPS[op_id]["parameters"]) if p["in"] == "query"}


def header_params(op_id: str) -> set[str]:
    return {p["name"] for p in map(resolve, OPS[op_id]["parameters"]) if p["in"] == "header"}


# -- query parameters ---------------------------------------------------------------------------

def test_the_document_declares_every_query_parameter() -> None:
    for e in ENDPOINTS:
        declared = {name: p["required"] for name, p in query_params(e.operation_id).items()}
        assert declared == EXPECTED_QUERY.get(e.operation_id, {}), e.operation_id


@pytest.mark.parametrize("op_id", ["listKeys", "listPrincipals", "listGrants", "auditSearch"])
def test_page_limits_are_bounded_1_to_1000(op_id: str) -> None:
    assert query_params(op_id)["limit"]["schema"] == {
        "type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
    assert query_params("revocations")["limit"]["schema"]["maximum"] == 1000


class _Recording(dict[str, str]):
    """A query dict that notes every name a handler looks up."""

    reads: list[str]

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.reads.append(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.reads.append(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.reads.append(str(key))
        return super().__contains__(key)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.operation_id)
async def test_each_handler_reads_exactly_the_declared_query_parameters(
        world: World, http: Any, monkeypatch: pytest.MonkeyPatch, endpoint: Endpoint) -> None:
    reads: list[str] = []
    original = app_module._Request.query

    def recording(self: Any) -> dict[str, str]:
        q = _Recording(original(self))
        q.reads = reads
        return q

    monkeypatch.setattr(app_module._Request, "query", recording)
    url, body = case_for(endpoint, world)
    r = await send(http, endpoint, url, body, world.auth if endpoint.auth else None)
    assert r.status_code < 400, r.text
    assert set(reads) == {q.name for q in endpoint.query}


INT_PARAMS = [(e, q.name) for e in ENDPOINTS for q in e.query if q.schema["type"] == "integer"]


@pytest.mark.parametrize(("endpoint", "name"), INT_PARAMS,
                         ids=[f"{e.operation_id}-{n}" for e, n in INT_PARAMS])
async def test_integer_parameters_are_read_by_the_server(world: World, http: Any,
                                                         endpoint: Endpoint, name: str) -> None:
    """A declared integer parameter that is not an integer is refused: the server reads it."""
    url, body = case_for(endpoint, world)
    path, _, query = url.partition("?")
    pairs = [p for p in query.split("&") if p and not p.startswith(f"{name}=")]
    r = await send(http, endpoint, f"{path}?{'&'.join([*pairs, f'{name}=x'])}", body,
                   world.auth if endpoint.auth else None)
    err = assert_error(r, 400, "invalid_request")
    assert repr(name) in err["message"]


@pytest.mark.parametrize(("op_id", "url"), [
    ("auditInclusionProof", "/v1/audit/proof/inclusion?size=8"),
    ("auditConsistencyProof", "/v1/audit/proof/consistency?new=8"),
])
async def test_required_parameters_are_required_by_the_server(world: World, http: Any, op_id: str,
                                                              url: str) -> None:
    name = next(n for n, p in query_params(op_id).items() if p["required"])
    err = assert_error(await http.get(url, headers=world.auth), 400, "invalid_request")
    assert repr(name) in err["message"]


@pytest.mark.parametrize(("url", "limit"), [
    ("/v1/keys", "limit"), ("/v1/principals", "limit"), ("/v1/grants?key=enc", "limit"),
    ("/v1/audit/events", "limit"), ("/v1/revocations", "limit")])
async def test_page_limits_outside_the_documented_bounds_are_refused(world: World, http: Any,
                                                                     url: str, limit: str) -> None:
    sep = "&" if "?" in url else "?"
    for value in (0, 1001):
        assert_error(await http.get(f"{url}{sep}{limit}={value}", headers=world.auth), 400,
                     "invalid_request")
    assert (await http.get(f"{url}{sep}{limit}=1000", headers=world.auth)).status_code == 200


async def test_grant_states_are_the_documented_enum(world: World, http: Any) -> None:
    states = query_params("listGrants")["state"]["schema"]["enum"]
    assert states
    for state in states:
        r = await http.get(f"/v1/grants?key=enc&state={state}", headers=world.auth)
        assert r.status_code == 200, (state, r.text)
    assert_error(await http.get("/v1/grants?key=enc&state=bogus", headers=world.auth), 400,
                 "invalid_request")


def test_audit_time_filters_are_date_times() -> None:
    params = query_params("auditSearch")
    assert params["since"]["schema"]["format"] == params["until"]["schema"]["format"] == "date-time"


# -- headers ------------------------------------------------------------------------------------

def test_request_headers_are_declared() -> None:
    for e in ENDPOINTS:
        headers = header_params(e.operation_id)
        assert "X-Request-Id" in headers
        assert ("Keygrants-Grant" in headers) == e.grant, e.operation_id
        assert ("DPoP" in headers) == (e.grant or e.operation_id == "exchangeGrant"), e.operation_id
    assert {op for op in OPS if "Keygrants-Grant" in header_params(op)} >= {
        "encrypt", "decrypt", "sign", "createGrant"}


GRANT_PROBES = [e for e in ENDPOINTS if e.auth]


@pytest.mark.parametrize("endpoint", GRANT_PROBES, ids=lambda e: e.operation_id)
async def test_keygrants_grant_is_accepted_exactly_where_declared(world: World, http: Any,
                                                                  endpoint: Endpoint) -> None:
    url, body = case_for(endpoint, world)
    r = await send(http, endpoint, url, body, {**world.auth, "Keygrants-Grant": "not-a-token"})
    code = r.json()["error"]["code"]
    if "Keygrants-Grant" in header_params(endpoint.operation_id):
        assert r.status_code == 403 and code.startswith("grant_"), r.text
    else:
        err = assert_error(r, 400, "invalid_request")
        assert "does not accept a grant token" in err["message"]


def test_response_headers_are_declared() -> None:
    for e in ENDPOINTS:
        responses = {status: resolve(r) for status, r in OPS[e.operation_id]["responses"].items()}
        for status, r in responses.items():
            assert "X-Request-Id" in r["headers"], (e.operation_id, status)
        ok = responses[str(e.status)]["headers"]
        assert ("X-Audit-Index" in ok) == e.auth
        if e.auth:
            assert {"WWW-Authenticate", "DPoP-Nonce"} <= set(responses["401"]["headers"])
            assert "Retry-After" in responses["429"]["headers"]
        else:
            assert "401" not in responses
    assert "Cache-Control" in resolve(OPS["jwks"]["responses"]["200"])["headers"]
    assert resolve(COMPONENTS["headers"]["X-Request-Id"])["required"] is True


async def test_x_audit_index_and_www_authenticate_are_sent(world: World, http: Any) -> None:
    r = await http.get("/v1/keys", headers=world.auth)
    assert r.status_code == 200 and int(r.headers["x-audit-index"]) >= 0
    r = await http.get("/v1/keys")
    assert r.status_code == 401 and r.headers.get_list("www-authenticate")


# -- statuses and bodies ------------------------------------------------------------------------

def test_statuses_are_documented() -> None:
    grant = OPS["createGrant"]["responses"]
    assert {"201", "202"} <= set(grant)
    assert grant["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/GrantCreated"}
    ready = OPS["ready"]["responses"]
    assert ready["503"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Readiness"}
    for e in ENDPOINTS:
        statuses = set(OPS[e.operation_id]["responses"])
        assert {"408", "431", "default"} <= statuses
        assert ("413" in statuses) == (e.request is not None)
    for op_id, schema in [("health", "Health"), ("ready", "Readiness"), ("jwks", "JwkSet")]:
        assert OPS[op_id]["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{schema}"}
    export = OPS["auditExport"]["responses"]["200"]["content"]
    assert list(export) == ["application/x-ndjson"]


async def test_create_grant_answers_its_documented_202(world: World, http: Any) -> None:
    world.access.service.put_policy(ADMIN, "svc-break-glass",
                                    m.PutPolicyRequest(text=BREAK_GLASS_POLICY))
    r = await http.post("/v1/grants", headers={"Authorization": f"Bearer {world.api_key}"},
                        json={"key": "enc", "grantee": "svc", "operations": ["encrypt"],
                              "justification": "incident 43"})
    assert r.status_code == 202, r.text
    assert "202" in OPS["createGrant"]["responses"]
    created = msgspec.json.decode(r.content, type=BY_ID["createGrant"].responses[0].body)
    assert created.token is None and created.grant.state == "pending"


async def test_readyz_503_body_is_the_documented_one(world: World, http: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from keygrants.errors import StoreError

    def broken(name: str) -> bytes | None:
        raise StoreError("disk on fire")

    monkeypatch.setattr(world.store, "get_meta", broken)
    r = await http.get("/readyz")
    assert r.status_code == 503
    extra = {x.status: x.body for x in BY_ID["ready"].responses}
    assert msgspec.json.decode(r.content, type=extra[503]) == {"status": "unavailable"}


# -- request bodies -----------------------------------------------------------------------------

OPTIONAL_BODY = {"scheduleKeyDeletion", "generateDataKey", "generateRandom", "updateKey",
                 "updatePrincipal", "createApiKey", "createSharedSecret", "approveGrant",
                 "rejectGrant", "revokeAllGrants", "addCertificate"}


def test_a_body_is_required_only_when_a_field_is() -> None:
    optional = {e.operation_id for e in ENDPOINTS
                if e.request is not None and not OPS[e.operation_id]["requestBody"]["required"]}
    assert optional == OPTIONAL_BODY


@pytest.mark.parametrize("op_id", sorted(OPTIONAL_BODY - {"revokeAllGrants", "addCertificate"}))
async def test_an_optional_body_may_be_left_out(world: World, http: Any, op_id: str) -> None:
    endpoint = BY_ID[op_id]
    url, _ = case_for(endpoint, world)
    r = await http.request(endpoint.method, url, headers=world.auth)
    assert r.status_code == endpoint.status, r.text


# -- value limits and formats -------------------------------------------------------------------

def _prop(schema: str, field: str) -> dict[str, Any]:
    prop: dict[str, Any] = COMPONENTS["schemas"][schema]["properties"][field]
    return next((b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"), prop)


def test_value_limits_match_the_services_constants() -> None:
    from keygrants import access, grant_service, service
    from keygrants.audit import log as audit_log
    from keygrants.audit.service import MAX_HASH_INPUT
    from keygrants.auth.model import PRINCIPAL_NAME_PATTERN
    from keygrants.keys import context, tags
    from keygrants.keys.model import NAME_PATTERN

    limits, settings = service.Limits(), grant_service.GrantSettings()
    assert _prop("CreateKeyRequest", "name")["pattern"] == NAME_PATTERN
    assert _prop("CreateAliasRequest", "alias")["pattern"] == NAME_PATTERN
    assert _prop("CreateKeyRequest", "tags")["maxItems"] == tags.MAX_TAGS
    assert _prop("CreateKeyRequest", "tags")["items"]["pattern"] == tags.TAG_PATTERN
    assert _prop("CreateKeyRequest", "description")["maxLength"] == service.MAX_DESCRIPTION_LENGTH
    period = _prop("CreateKeyRequest", "rotation_period")
    assert (period["minimum"], period["maximum"]) == (service.MIN_ROTATION_PERIOD,
                                                      service.MAX_ROTATION_PERIOD)
    days = _prop("ScheduleDeletionRequest", "days")
    assert (days["minimum"], days["maximum"]) == (service.MIN_DELETION_DAYS,
                                                  service.MAX_DELETION_DAYS)
    assert set(_prop("DataKeyRequest", "bytes")["enum"]) == service.DATA_KEY_SIZES
    assert _prop("RandomRequest", "bytes")["maximum"] == limits.max_random_bytes
    assert _prop("DeriveRequest", "length")["maximum"] == limits.max_derive_bytes
    assert _prop("BatchEncryptRequest", "items")["maxItems"] == limits.max_batch_items
    assert _prop("BatchDecryptRequest", "items")["maxItems"] == limits.max_batch_items
    ctx = _prop("EncryptRequest", "context")
    assert ctx["maxProperties"] == context.MAX_CONTEXT_ENTRIES
    assert ctx["propertyNames"]["maxLength"] == context.MAX_CONTEXT_KEY_LENGTH
    assert ctx["additionalProperties"]["maxLength"] == context.MAX_CONTEXT_VALUE_LENGTH
    assert _prop("AuditHashRequest", "value")["maxLength"] == MAX_HASH_INPUT
    assert _prop("CreatePrincipalRequest", "id")["pattern"] == PRINCIPAL_NAME_PATTERN
    assert _prop("CreatePrincipalRequest", "display_name")["maxLength"] == access.MAX_DISPLAY_NAME
    assert _prop("CreateApiKeyRequest", "label")["maxLength"] == access.MAX_LABEL
    assert _prop("PutPolicyRequest", "description")["maxLength"] == access.MAX_POLICY_DESCRIPTION
    assert _prop("CreateGrantRequest", "ttl")["maximum"] == settings.max_ttl
    assert _prop("CreateGrantRequest", "max_uses")["maximum"] == settings.max_uses
    assert _prop("CreateGrantRequest", "audiences")["maxItems"] == grant_service.MAX_AUDIENCES
    assert _prop("CreateGrantRequest", "name")["maxLength"] == grant_service.MAX_NAME
    assert _prop("GrantDecisionRequest", "note")["maxLength"] == grant_service.MAX_JUSTIFICATION
    for limit in (service.MAX_LIST_LIMIT, access.MAX_LIST_LIMIT, grant_service.MAX_LIST_LIMIT,
                  audit_log.MAX_QUERY_LIMIT):
        assert limit == 1000  # the documented maximum of every page `limit`
    assert query_params("auditSearch")["type"]["schema"]["maxLength"] == audit_log._MAX_FILTER


def test_documented_limits_are_not_checked_by_msgspec() -> None:
    """The limits are documentation: decoding is unchanged, the service still refuses with its
    own codes and messages."""
    req = msgspec.json.decode(json.dumps({"name": "-bad", "description": "x" * 5000,
                                          "tags": ["t"] * 100}), type=m.CreateKeyRequest)
    assert len(req.description) == 5000


async def test_the_service_still_refuses_out_of_bounds_values(world: World, http: Any) -> None:
    r = await http.post("/v1/random", json={"bytes": 1025}, headers=world.auth)
    assert_error(r, 400, "invalid_request")


def _datetime_fields() -> list[tuple[str, str]]:
    types = [t for e in ENDPOINTS for t in (e.request, e.response) if t is not None]
    found: list[tuple[str, str]] = []
    for info in mi.multi_type_info(types):
        stack: list[Any] = [info]
        seen: set[type] = set()
        while stack:
            t = stack.pop()
            if isinstance(t, mi.Metadata):
                stack.append(t.type)
            elif isinstance(t, mi.StructType) and t.cls not in seen:
                seen.add(t.cls)
                for f in t.fields:
                    inner = [f.type] if not isinstance(f.type, mi.UnionType) else list(f.type.types)
                    if any(isinstance(x, mi.DateTimeType) for x in inner):
                        found.append((t.cls.__name__, f.encode_name))
                    stack.append(f.type)
            elif isinstance(t, mi.UnionType):
                stack.extend(t.types)
            elif isinstance(t, mi.ListType):
                stack.append(t.item_type)
    return sorted(set(found))


def test_times_are_date_times() -> None:
    fields = _datetime_fields()
    assert ("KeyInfo", "created_at") in fields and ("CreateGrantRequest", "not_before") in fields
    for schema, field in [*fields, ("AuditEvent", "time")]:
        assert _prop(schema, field) == {"type": "string", "format": "date-time"}, (schema, field)


# -- the document as a whole --------------------------------------------------------------------

def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"] == "3.1.0"
    text = json.dumps(DOC)
    for ref in re.findall(r'"\$ref": "#/components/(\w+)/([^"]+)"', text):
        assert ref[1] in COMPONENTS[ref[0]], ref
    for e in ENDPOINTS:
        op = OPS[e.operation_id]
        params = [resolve(p) for p in op["parameters"]]
        assert len({(p["name"], p["in"]) for p in params}) == len(params), e.operation_id
        assert {p["name"] for p in params if p["in"] == "path"} == set(re.findall(r"{(\w+)}", e.path))
        assert all(p["required"] for p in params if p["in"] == "path")
        for status, response in op["responses"].items():
            assert status == "default" or re.fullmatch(r"[1-5]\d\d", status)
            assert resolve(response)["description"]
    try:
        from openapi_spec_validator import validate
    except ImportError:  # not a declared test dependency: the checks above still ran
        return
    validate(DOC)


async def test_the_served_document_is_the_generated_one(http: Any) -> None:
    r = await http.get("/openapi.json")
    assert r.json() == json.loads(json.dumps(DOC))
