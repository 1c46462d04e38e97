"""The service's OpenAPI document, written from the same pydantic models the guard validates with, and
narrowed to the loaded bundle (its scenarios and context vocabularies), so that what the document allows
is what the service answers with 200, and every other status it can send is listed with its body."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from serving.bundle import Bundle
from serving.context import allowed_values, context_keys

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what was wrong, naming the value"},
                   "field": {"type": "string", "description": "the request field at fault (dotted)"}},
}
REASONS = {400: "malformed request (body, JSON or a field)", 401: "admin token missing or wrong",
           403: "admin endpoints are disabled (no token configured)", 409: "not possible in this deployment",
           413: "request body too large", 415: "content type is not application/json",
           422: "well-formed but refused: unknown scenario or context value, or a bundle refused",
           503: "no bundle loaded"}
ANY_OBJECT = {"type": "object", "additionalProperties": True}


@dataclass
class Operation:
    path: str
    method: str
    summary: str
    request: type[BaseModel] | None
    response: type[BaseModel] | None
    statuses: tuple[int, ...]
    admin: bool = False
    body_required: bool = True
    tags: list[str] = field(default_factory=lambda: ["feedstack"])


def _schema(model: type[BaseModel], mode: str, defs: dict[str, Any]) -> dict[str, Any]:
    s = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)  # type: ignore[arg-type]
    defs.update(s.pop("$defs", {}))
    return s


def _narrow(schema: dict[str, Any], bundle: Bundle) -> dict[str, Any]:
    """Scenario and context limited to what this bundle knows (the service answers 422 otherwise)."""
    s = copy.deepcopy(schema)
    props = s.get("properties", {})
    if "scenario" in props:
        props["scenario"] = {"anyOf": [{"type": "string", "enum": sorted(bundle.ranking.scenarios)}, {"type": "null"}],
                             "default": None, "description": props["scenario"].get("description", "fusion scenario")}
    if "context" in props:
        keys = {}
        for name in context_keys(bundle):
            values = allowed_values(bundle, name)
            ints = [int(v) for v in values if v.isdigit() and str(int(v)) == v]
            branches = [{"type": "string", "enum": values}]
            if ints:
                branches.insert(0, {"type": "integer", "enum": ints})
            keys[name] = {"anyOf": branches}
        props["context"] = {"anyOf": [{"type": "object", "properties": keys, "additionalProperties": False},
                                      {"type": "null"}],
                            "default": None, "description": "request context; keys and values the bundle knows"}
    return s


def build_openapi(operations: list[Operation], bundle: Bundle | None, version: str = "1") -> dict[str, Any]:
    defs: dict[str, Any] = {"Error": ERROR}
    paths: dict[str, Any] = {}
    for op in operations:
        responses: dict[str, Any] = {
            "200": {"description": "OK", "content": {"application/json": {
                "schema": _schema(op.response, "serialization", defs) if op.response else ANY_OBJECT}}}}
        for status in op.statuses:
            responses[str(status)] = {"description": REASONS[status], "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        entry: dict[str, Any] = {"summary": op.summary, "tags": op.tags, "responses": responses}
        if op.request is not None:
            body = _schema(op.request, "validation", defs)
            entry["requestBody"] = {"required": op.body_required, "content": {"application/json": {
                "schema": _narrow(body, bundle) if bundle is not None else body}}}
        if op.admin:
            entry["security"] = [{"bearer": []}, {"adminToken": []}]
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "feedstack", "version": version,
                 "description": "Short-video feed recommendations: retrieval, multi-task ranking, feed policy."},
        "paths": paths,
        "components": {"schemas": defs, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "adminToken": {"type": "apiKey", "in": "header", "name": "X-Admin-Token"}}},
    }
