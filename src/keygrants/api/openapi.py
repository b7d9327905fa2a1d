"""The OpenAPI 3.1 document, generated from the endpoint table and the msgspec models."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from keygrants._version import __version__

if TYPE_CHECKING:
    from keygrants.api.app import Endpoint

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{name}"

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


def openapi_document(endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """Build the document: one operation per endpoint, schemas from the models."""
    types = [t for e in endpoints for t in (e.request, e.response) if t is not None]
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    schema_of = dict(zip(types, schemas, strict=True))
    components["Error"] = _ERROR_SCHEMA
    error = {"application/json": {"schema": {"$ref": _REF.format(name="Error")}}}
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        op: dict[str, Any] = {"operationId": e.operation_id, "summary": e.summary, "tags": [e.tag]}
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in re.findall(r"{(\w+)}", e.path)]
        if params:
            op["parameters"] = params
        if e.request is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": schema_of[e.request]}}}
        ok: dict[str, Any] = {"description": "success"}
        if e.response is not None:
            ok["content"] = {"application/json": {"schema": schema_of[e.response]}}
        op["responses"] = {str(e.status): ok, "default": {"description": "error", "content": error}}
        if e.auth:
            op["security"] = [{"httpSignature": []}, {"bearer": []}, {"mutualTLS": []}]
        paths.setdefault(e.path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "keygrants", "version": __version__,
                 "description": "Key management with scoped, short-lived, audited key grants."},
        "paths": paths,
        "components": {
            "schemas": components,
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
