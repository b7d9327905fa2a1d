"""The OpenAPI 3.1 document, generated from the endpoint table and the msgspec models.

Besides the schemas msgspec derives from the models, each operation declares what a client
generated from the document needs to talk to the server: the query parameters its handler
reads (:attr:`Endpoint.query`), the request headers that change its meaning
(``Keygrants-Grant``, ``DPoP``, ``X-Request-Id``), every status it answers with its body and
headers (``X-Request-Id``, ``X-Audit-Index``, ``WWW-Authenticate``, ``DPoP-Nonce``,
``Retry-After``), and whether its body may be left out (every field has a default: an empty
body is read as ``{}``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec
import msgspec.inspect as mi

from keygrants._version import __version__

if TYPE_CHECKING:
    from keygrants.api.app import Endpoint

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{name}"
_JSON: Final = "application/json"

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "request_id"],
            "properties": {
                "code": {"type": "string", "description": "machine-readable error code"},
                "message": {"type": "string"},
                "request_id": {"type": ["string", "null"]},
            },
        }
    },
}

# The HTTP server refuses a request head that is too large or too slow before the application
# sees it: the same shape without a request id (and no X-Request-Id header).
_HEAD_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "request_id": {"type": ["string", "null"]},
            },
        }
    },
}

# string fields of models outside this package's control that hold RFC 3339 times
_DATE_TIME_STRINGS: Final = {"AuditEvent": ("time",)}

_REQUEST_ID_PATTERN: Final = "^[A-Za-z0-9._:-]{1,64}$"

_PARAMETERS: dict[str, Any] = {
    "X-Request-Id": {
        "name": "X-Request-Id", "in": "header", "required": False,
        "description": "A correlation id, echoed in the X-Request-Id response header, in errors "
                       "and in audit events; one that does not match the pattern is replaced "
                       "by a server-generated id.",
        "schema": {"type": "string", "pattern": _REQUEST_ID_PATTERN}},
    "Keygrants-Grant": {
        "name": "Keygrants-Grant", "in": "header", "required": False,
        "description": "A grant token to act under instead of the caller's own policies.",
        "schema": {"type": "string"}},
    "DPoP": {
        "name": "DPoP", "in": "header", "required": False,
        "description": "An RFC 9449 proof of possession, for a DPoP-bound grant token.",
        "schema": {"type": "string"}},
}

_HEADERS: dict[str, Any] = {
    "X-Request-Id": {
        "required": True, "schema": {"type": "string"},
        "description": "The caller's X-Request-Id if valid, else a server-generated id."},
    "X-Audit-Index": {
        "schema": {"type": "integer", "minimum": 0},
        "description": "Sequence number of the request's last audit event (when it recorded "
                       "one)."},
    "WWW-Authenticate": {
        "required": True, "schema": {"type": "string"},
        "description": "Signature and Bearer challenges with the error code; "
                       "`DPoP error=\"use_dpop_nonce\"` when a DPoP nonce is needed."},
    "DPoP-Nonce": {
        "schema": {"type": "string"},
        "description": "The nonce to put in the next DPoP proof (with use_dpop_nonce)."},
    "Retry-After": {
        "required": True, "schema": {"type": "integer", "minimum": 1},
        "description": "Seconds to wait before the next request."},
    "Cache-Control": {
        "schema": {"type": "string"},
        "description": "`public, max-age=<seconds>`: the refresh hint."},
}


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _error_response(description: str, *headers: str, schema: str = "Error") -> dict[str, Any]:
    return {"description": description,
            "headers": {h: _ref("headers", h) for h in ("X-Request-Id", "X-Audit-Index", *headers)},
            "content": {_JSON: {"schema": {"$ref": _REF.format(name=schema)}}}}


def _head_error(description: str) -> dict[str, Any]:
    return {"description": description,
            "headers": {"X-Request-Id": {"schema": {"type": "string"},
                                         "description": "absent when the HTTP server refused "
                                                        "the request head"}},
            "content": {_JSON: {"schema": {"$ref": _REF.format(name="HeadError")}}}}


_RESPONSES: dict[str, Any] = {
    "Unauthenticated": _error_response(
        "no, invalid or refused credentials (`unauthenticated`, `unknown_key`, ...), or a DPoP "
        "nonce is needed (`use_dpop_nonce`, with DPoP-Nonce)", "WWW-Authenticate", "DPoP-Nonce"),
    "RateLimited": _error_response("`rate_limited`: the caller's request rate is over its limit",
                                   "Retry-After"),
    "PayloadTooLarge": _error_response("`payload_too_large`: the body is over the size limit"),
    "RequestTimeout": _head_error("`request_timeout`: the request head or body did not arrive "
                                  "in time; the connection closes"),
    "HeaderTooLarge": _head_error("`header_too_large`: the request head, or one header, is over "
                                  "its limit"),
    "Error": _error_response("any other error, in the one error shape"),
}


def _structs(types: Iterable[Any]) -> dict[str, mi.StructType | mi.TypedDictType]:
    """Every struct and TypedDict reachable from ``types``, by component name."""
    found: dict[str, mi.StructType | mi.TypedDictType] = {}
    stack: list[mi.Type] = list(mi.multi_type_info(list(types)))
    while stack:
        t = stack.pop()
        if isinstance(t, mi.Metadata):
            stack.append(t.type)
        elif isinstance(t, mi.StructType | mi.TypedDictType):
            if t.cls.__name__ not in found:
                found[t.cls.__name__] = t
                stack.extend(f.type for f in t.fields)
        elif isinstance(t, mi.UnionType):
            stack.extend(t.types)
        elif isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
            stack.append(t.item_type)
        elif isinstance(t, mi.DictType):
            stack.append(t.value_type)
    return found


def _is_date_time(t: mi.Type) -> bool:
    if isinstance(t, mi.Metadata):
        return _is_date_time(t.type)
    if isinstance(t, mi.UnionType):
        return any(_is_date_time(u) for u in t.types)
    return isinstance(t, mi.DateTimeType)


def _format_date_time(prop: dict[str, Any]) -> None:
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "string":
            branch.setdefault("format", "date-time")


def _add_date_time_formats(types: Iterable[Any], components: dict[str, Any]) -> None:
    """msgspec renders ``datetime`` as a bare string: say it is an RFC 3339 date-time."""
    for name, info in _structs(types).items():
        props = components.get(name, {}).get("properties", {})
        for f in info.fields:
            if f.encode_name in props and (_is_date_time(f.type)
                                           or f.name in _DATE_TIME_STRINGS.get(name, ())):
                _format_date_time(props[f.encode_name])


def _body_optional(request: type) -> bool:
    """Whether every field has a default (the server reads an empty body as ``{}``)."""
    info = mi.type_info(request)
    return isinstance(info, mi.StructType) and not any(f.required for f in info.fields)


def _content(media_type: str, schema: dict[str, Any] | None) -> dict[str, Any]:
    if media_type == "application/x-ndjson":
        schema = {"type": "string", "description": "JSON Lines: one JSON object per line"}
    elif media_type.startswith("text/plain"):
        schema = {"type": "string"}
    return {media_type: {"schema": schema}} if schema is not None else {}


def _operation(e: Endpoint, schema_of: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": e.operation_id, "summary": e.summary, "tags": [e.tag]}
    params: list[dict[str, Any]] = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
        for p in re.findall(r"{(\w+)}", e.path)]
    params += [{"name": q.name, "in": "query", "required": q.required,
                "description": q.description, "schema": dict(q.schema)} for q in e.query]
    params.append(_ref("parameters", "X-Request-Id"))
    if e.grant:
        params.append(_ref("parameters", "Keygrants-Grant"))
    if e.grant or e.dpop:
        params.append(_ref("parameters", "DPoP"))
    op["parameters"] = params
    if e.request is not None:
        op["requestBody"] = {
            "required": not _body_optional(e.request),
            "content": {_JSON: {"schema": schema_of[e.request]}}}
    success_headers = ["X-Request-Id", *(["X-Audit-Index"] if e.auth else []),
                       *e.response_headers]
    ok: dict[str, Any] = {"description": "no content" if e.status == 204 else "success",
                          "headers": {h: _ref("headers", h) for h in success_headers}}
    content = _content(e.media_type, schema_of.get(e.response))
    if content:
        ok["content"] = content
    responses: dict[str, Any] = {str(e.status): ok}
    for extra in e.responses:
        r: dict[str, Any] = {"description": extra.description,
                             "headers": {h: _ref("headers", h) for h in success_headers}}
        if extra.body is not None:
            r["content"] = _content(_JSON, schema_of[extra.body])
        responses[str(extra.status)] = r
    if e.auth:
        responses["401"] = _ref("responses", "Unauthenticated")
        responses["429"] = _ref("responses", "RateLimited")
    responses["408"] = _ref("responses", "RequestTimeout")
    if e.request is not None:
        responses["413"] = _ref("responses", "PayloadTooLarge")
    responses["431"] = _ref("responses", "HeaderTooLarge")
    responses["default"] = _ref("responses", "Error")
    op["responses"] = dict(sorted(responses.items(), key=lambda kv: (kv[0] == "default", kv[0])))
    if e.auth:
        op["security"] = [{"httpSignature": []}, {"bearer": []}, {"mutualTLS": []}]
    return op


def openapi_document(endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """Build the document: one operation per endpoint, schemas from the models."""
    types = list(dict.fromkeys(
        t for e in endpoints
        for t in (e.request, e.response, *(r.body for r in e.responses)) if t is not None))
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    _add_date_time_formats(types, components)
    schema_of = dict(zip(types, schemas, strict=True))
    components["Error"] = _ERROR_SCHEMA
    components["HeadError"] = _HEAD_ERROR_SCHEMA
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        paths.setdefault(e.path, {})[e.method.lower()] = _operation(e, schema_of)
    return {
        "openapi": "3.1.0",
        "info": {"title": "keygrants", "version": __version__,
                 "description": "Key management with scoped, short-lived, audited key grants."},
        "paths": paths,
        "components": {
            "schemas": components,
            "parameters": _PARAMETERS,
            "headers": _HEADERS,
            "responses": _RESPONSES,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "An API key (kg_ak_...) or the admin token."},
                "httpSignature": {
                    "type": "apiKey", "in": "header", "name": "Signature",
                    "description": "RFC 9421 HTTP Message Signature with Signature-Input (and "
                                   "Content-Digest for a body); keyid <principal>/<credential "
                                   "id>. See docs/auth.md."},
                "mutualTLS": {"type": "mutualTLS",
                              "description": "A client certificate mapped to a principal."},
            },
        },
    }
