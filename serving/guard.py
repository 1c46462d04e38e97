"""HTTP hygiene in front of the BentoML app, as two ASGI middlewares.

``RouteGuard`` runs outermost (ahead of BentoML's traffic metrics, which label every request by its raw
path): a path no route serves gets a 404 here, so random paths cannot grow ``/metrics`` without bound.

``RequestGuard`` runs inside it, ahead of BentoML's own input handling, on the service's POST endpoints:
admin token first (an unauthenticated caller learns nothing about the body), then JSON only (415 for any
other content type, which also keeps multipart parsing away), a size limit, strict JSON (no duplicate keys,
no NaN / Infinity) and the endpoint's pydantic model; every refusal is a JSON ``{"error", "field"}`` body
and one log line. ``GET /docs.json`` is answered with the service's own OpenAPI document.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

log = logging.getLogger("feedstack.serving.http")

MAX_BODY_BYTES = 1 << 20


class BadRequest(ValueError):
    def __init__(self, status: int, message: str, field_name: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field_name


@dataclass
class Endpoint:
    """A POST endpoint the guard checks: its request model (None: no body expected) and whether it is admin."""

    model: type[BaseModel] | None
    admin: bool = False
    body_optional: bool = False


@dataclass
class Hooks:
    """What the guard asks the running service (set by it once per worker process)."""

    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    check_token: Callable[[dict[str, str]], tuple[int, str] | None] | None = None
    openapi: Callable[[], dict[str, Any]] | None = None
    bundle_info: Callable[[], dict[str, Any]] | None = None  # GET /bundle (BentoML APIs are POST only)
    methods: dict[str, set[str]] = field(default_factory=dict)  # path -> documented methods, for 405's Allow
    count: Callable[[str, str], None] | None = None  # (endpoint, outcome)


HOOKS = Hooks()


# --------------------------------------------------------------------------- strict JSON


def _pairs(kv: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in kv:
        if k in out:
            raise BadRequest(400, f"duplicate JSON key '{k}'", k)
        out[k] = v
    return out


def _constant(name: str) -> Any:
    raise BadRequest(400, f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(400, f"number {text[:40]} is out of range")
    return value


def parse_json(raw: bytes) -> Any:
    """JSON as RFC 8259 has it: duplicate keys, NaN / Infinity and overflowing numbers are errors."""
    try:
        return json.loads(raw, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_finite)
    except BadRequest:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, int digit limit, nesting
        raise BadRequest(400, f"malformed JSON body: {str(e)[:200]}") from None


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """The first pydantic error as (message naming the field, dotted field)."""
    err = e.errors(include_url=False, include_input=False)[0]
    loc = [str(p) for p in err.get("loc", ())]
    # A union reports each branch (``user_id.str``): the field is the part before the branch names.
    branches = {"str", "int", "float", "bool", "constrained-str", "constrained-int", "list", "dict"}
    while loc and (loc[-1] in branches or loc[-1].startswith(("function-", "constrained-"))):
        loc.pop()
    name = ".".join(loc) or None
    msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid value")
    return (f"{name}: {msg}" if name else msg), name


def validate_body(endpoint: Endpoint, raw: bytes) -> None:
    if endpoint.model is None or (endpoint.body_optional and not raw.strip()):
        return
    if not raw.strip():
        raise BadRequest(400, "request body is empty; expected a JSON object")
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise BadRequest(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        endpoint.model.model_validate(data)
    except ValidationError as e:
        message, name = validation_message(e)
        raise BadRequest(400, message, name) from None


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


# --------------------------------------------------------------------------- ASGI plumbing


async def send_json(send: Callable, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}


def log_client_error(method: str, path: str, status: int, message: str) -> None:
    log.info("%s %s -> %d: %s", method, path[:200], status, message[:300])


async def _read_body(receive: Callable) -> tuple[bytes, bool]:
    """The whole request body, or (what was read, False) once it passes MAX_BODY_BYTES."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return b"", False
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


_EXACT: set[str] = set()  # paths an exact (parameter-free) route matched: bounded by the route table


def _known_route(scope: dict[str, Any]) -> bool:
    from starlette.routing import Match, Mount

    if scope.get("path") in _EXACT:
        return True
    app = scope.get("app")
    routes = getattr(app, "routes", None)
    if routes is None:  # not under a Starlette app: nothing to check against
        return True
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.NONE:
            continue
        if isinstance(route, Mount):  # static files: only paths that exist, else every probe is a label
            directory = getattr(route.app, "directory", None)
            rest = child.get("path_params", {}).get("path", "")
            return bool(directory) and os.path.isfile(os.path.join(str(directory), os.path.normpath("/" + rest)[1:]))
        if not getattr(route, "param_convertors", None):
            _EXACT.add(scope["path"])
        return True
    return False


class RouteGuard:
    """Outermost: unknown paths end here with a 404 (no per-path metric label, one log line)."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and not _known_route(scope):
            log_client_error(scope.get("method", "?"), scope.get("path", ""), 404, "no such endpoint")
            if HOOKS.count is not None:
                HOOKS.count("unknown", "not_found")
            await send_json(send, 404, {"error": "no such endpoint"})
            return
        await self.app(scope, receive, send)


class RequestGuard:
    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", ""), scope.get("path", "")
        if method == "GET" and path == "/docs.json" and HOOKS.openapi is not None:
            await send_json(send, 200, HOOKS.openapi())
            return
        if method == "GET" and path == "/bundle" and HOOKS.bundle_info is not None:
            await send_json(send, 200, HOOKS.bundle_info())
            return
        allowed = HOOKS.methods.get(path)
        if allowed is not None and method not in allowed:  # Starlette's Allow would omit GET /bundle
            log_client_error(method, path, 405, "method not allowed")
            data = b'{"error":"method not allowed"}'
            await send({"type": "http.response.start", "status": 405, "headers": [
                (b"allow", ", ".join(sorted(allowed)).encode()), (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
            return
        endpoint = HOOKS.endpoints.get(path) if method == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, _logging_send(send, method, path))
            return
        try:
            body = await self._checked_body(endpoint, scope, receive)
        except BadRequest as e:
            log_client_error(method, path, e.status, str(e))
            if HOOKS.count is not None:
                HOOKS.count(path.strip("/").replace("/", "_"), "client_error")
            payload: dict[str, Any] = {"error": str(e)}
            if e.field is not None:
                payload["field"] = e.field
            await send_json(send, e.status, payload)
            return
        await self.app(scope, _replay(body, receive), _logging_send(send, method, path))

    async def _checked_body(self, endpoint: Endpoint, scope: dict[str, Any], receive: Callable) -> bytes:
        headers = _headers(scope)
        if endpoint.admin and HOOKS.check_token is not None:
            denied = HOOKS.check_token(headers)
            if denied is not None:
                raise BadRequest(*denied)
        body, complete = await _read_body(receive)
        if not complete:
            raise BadRequest(413, f"request body over {MAX_BODY_BYTES} bytes")
        content_type = headers.get("content-type", "")
        if endpoint.body_optional and not body.strip() and not content_type:
            return body
        if not is_json(content_type):
            raise BadRequest(415, f"content type must be application/json, got '{content_type[:80] or 'none'}'")
        validate_body(endpoint, body)
        return body


def _logging_send(send: Callable, method: str, path: str) -> Callable:
    """Pass the response through; a 4xx from the handler gets its one log line (with the error text)."""
    state: dict[str, Any] = {"status": 0, "body": b""}

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            state["status"] = message["status"]
        elif message["type"] == "http.response.body" and 400 <= state["status"] < 500:
            state["body"] += message.get("body", b"")[:1000]
            if not message.get("more_body", False):
                try:
                    text = str(json.loads(state["body"]).get("error", ""))
                except (ValueError, AttributeError):
                    text = state["body"][:200].decode("utf-8", "replace")
                log_client_error(method, path, state["status"], text)
        await send(message)

    return wrapped


def install_route_guard() -> bool:
    """Put RouteGuard ahead of BentoML's own middlewares (its metrics label by raw path). BentoML offers
    ``add_asgi_middleware`` only inside its metrics middleware, hence the wrap of the factory's list."""
    try:
        from _bentoml_impl.server.app import ServiceAppFactory
        from starlette.middleware import Middleware
    except ImportError:  # another BentoML layout: keep serving, without the bound
        log.warning("BentoML app factory not found; unknown paths are not filtered before metrics")
        return False
    prop = ServiceAppFactory.middlewares
    if getattr(prop.fget, "_feedstack_route_guard", False):
        return True

    def middlewares(self: Any) -> list[Any]:
        return [Middleware(RouteGuard), *prop.fget(self)]

    middlewares._feedstack_route_guard = True  # type: ignore[attr-defined]
    ServiceAppFactory.middlewares = property(middlewares)  # type: ignore[method-assign]
    return True
