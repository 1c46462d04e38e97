"""The BentoML service: HTTP in, :class:`serving.recommender.Recommender` calls, HTTP out.

    BENTOML_DO_NOT_TRACK=true FEEDSTACK_BUNDLE=runs/kuairand/bundle \
        bentoml serve serving.service:Feedstack --host 127.0.0.1 --port 3000

(or ``python -m serving --bundle PATH_OR_MODELS_URI --port 3000``). Environment:
FEEDSTACK_BUNDLE (default ``models:/feedstack@production``), FEEDSTACK_SERVING_CONFIG (YAML with
``serving:`` / ``policy:``; default: the bundle's own recipe), FEEDSTACK_ADMIN_TOKEN, FEEDSTACK_WORKERS,
FEEDSTACK_THREADS.

Endpoints: POST /recommend, /rank, /bundle, /admin/block, /admin/reload; GET /livez, /readyz, /metrics,
/docs.json and the OpenAPI page at /.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import anyio
import bentoml
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from features.bundle import BundleError
from serving.config import (
    DEFAULT_BUNDLE, ENV_BUNDLE, ENV_CONFIG, ENV_OVERRIDES, ENV_STATE_DIR, MAX_EXCLUDE, MAX_ID_LENGTH, MAX_ITEM_IDS, MAX_K,
    ServeSettings, load_settings,
)
from serving.metrics import metrics
from serving.recommender import Recommender, RequestError, Result

log = logging.getLogger("feedstack.serving")

Id = Field(min_length=1, max_length=MAX_ID_LENGTH)
ContextValue = str | int | float


class _Strict(BaseModel):
    # Unknown fields and wrong JSON types are errors (a string "20" is not a k).
    model_config = ConfigDict(extra="forbid", strict=True)


class RecommendRequest(_Strict):
    user_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, description="user id as in the dataset")
    k: int = Field(20, ge=1, le=MAX_K, description="page size")
    scenario: str | None = Field(None, max_length=64, description="fusion scenario; default: serving.default_scenario")
    exclude_item_ids: list[str] = Field(default_factory=list, max_length=MAX_EXCLUDE,
                                        description="items the client already showed")
    context: dict[str, ContextValue] | None = Field(None, max_length=16, description="e.g. {\"tab\": 1, \"hour\": 20}")
    seen_item_ids: list[str] = Field(default_factory=list, max_length=MAX_EXCLUDE,
                                     description="items the user has seen: excluded now and remembered for "
                                                 "serving.seen_window_s")


class RankRequest(_Strict):
    user_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    item_ids: list[str] = Field(min_length=1, max_length=MAX_ITEM_IDS)
    scenario: str | None = Field(None, max_length=64)
    context: dict[str, ContextValue] | None = Field(None, max_length=16)


class Item(BaseModel):
    item_id: str
    creator_id: str
    score: float = Field(description="final score: fused head predictions plus any exposure boost")
    predictions: dict[str, float] = Field(description="per-head prediction")
    reasons: list[str] = Field(description="policy reasons (relevance, fan, quality_support, exposure_boost, "
                                           "exploration), then the candidate channel (channel:ann, ...)")
    watch_time_ms: float | None = Field(None, description="expected watch time (ms), decoded from the watch-time head")


class RecommendResponse(BaseModel):
    items: list[Item]
    bundle_version: str
    scenario: str
    cold_start: bool
    candidates: int


class RankResponse(RecommendResponse):
    unknown_item_ids: list[str]
    filtered_item_ids: list[str] = Field(description="known items governance keeps out (blocked or not visible)")


class BlockRequest(_Strict):
    item_ids: list[str] = Field(default_factory=list, max_length=10_000)
    creator_ids: list[str] = Field(default_factory=list, max_length=10_000)
    unblock: bool = False


class ReloadRequest(_Strict):
    bundle: str | None = Field(None, max_length=4096, description="path or models:/ URI; default: the startup source")


def _error(status: int, message: str, field: str | None = None, ctx: bentoml.Context | None = None) -> JSONResponse:
    """A 4xx/5xx JSON body naming the problem (and the request field). With a ``ctx`` parameter in the API,
    BentoML copies ``ctx.response.status_code`` onto the response, so it is set there too."""
    if ctx is not None:
        ctx.response.status_code = status
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status)


def _body(result: Result, **extra: Any) -> Response:
    """The response schema's JSON written directly: the hot path skips pydantic's output validation (the
    annotation still documents the schema in OpenAPI)."""
    items = [{"item_id": i.item_id, "creator_id": i.creator_id, "score": i.score, "predictions": i.predictions,
              "reasons": i.reasons, "watch_time_ms": i.watch_time_ms} for i in result.items]
    body = {"items": items, "bundle_version": result.bundle_version, "scenario": result.scenario,
            "cold_start": result.cold_start, "candidates": result.candidates, **extra}
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


WORKERS = int(os.environ.get("FEEDSTACK_WORKERS", "1"))  # worker processes of this service


@bentoml.service(
    name="feedstack",
    workers=WORKERS,
    threads=int(os.environ.get("FEEDSTACK_THREADS", "1")),
    traffic={"timeout": 60},
    metrics={"enabled": True},
    # Per-request access log lines cost ~0.1 ms on the hot path; FEEDSTACK_ACCESS_LOG=true turns them on.
    logging={"access": {"enabled": os.environ.get("FEEDSTACK_ACCESS_LOG", "false").lower() == "true"}},
)
class Feedstack:
    def __init__(self) -> None:
        self.source = os.environ.get(ENV_BUNDLE, DEFAULT_BUNDLE)
        # With several worker processes an admin call reaches one of them; the blocklist is published to a
        # file every worker checks (one stat per request), so governance holds in all of them.
        state_dir = os.environ.get(ENV_STATE_DIR)
        self._state_dir = Path(state_dir) if state_dir else None
        self._blocklist = self._state_dir / "blocklist.json" if self._state_dir else None
        self._blocklist_seen: int | None = None
        self.config_path = os.environ.get(ENV_CONFIG) or None
        self.metrics = metrics()
        self.recommender: Recommender | None = None
        self.load_error: str | None = None
        try:
            self.recommender = self._load(self.source)
            self.metrics.set_bundle(self.recommender.bundle.version)
            log.info("serving bundle %s from %s", self.recommender.bundle.version, self.source)
        except (BundleError, OSError, ValueError) as e:
            # Stay up but not ready: /readyz says 503 and an admin reload can bring a good bundle.
            self.load_error = str(e)
            log.error("no bundle loaded from %s: %s", self.source, e)

    def _load(self, source: str) -> Recommender:
        from serving.bundle import load_bundle, resolve_bundle

        overrides = json.loads(os.environ.get(ENV_OVERRIDES, "[]"))
        base = load_settings(self.config_path, None, overrides)
        path, version = resolve_bundle(source, base.serving.download_dir, base.serving.tracking_uri)
        bundle = load_bundle(path, registry_version=version, onnx_threads=base.serving.onnx_threads)
        settings = load_settings(self.config_path, bundle.manifest, overrides)
        # Several workers share one creator-exposure state (a memory-mapped file in the state dir), so the
        # fairness controller and the exported Gini see all the service's pages, not one worker's share.
        store = (self._state_dir / f"exposure-{bundle.version}.bin"
                 if self._state_dir is not None and WORKERS > 1 else None)
        return Recommender(bundle, settings, exposure_store=store)

    def __is_ready__(self) -> bool:
        return self.recommender is not None

    def _unavailable(self) -> JSONResponse:
        return _error(503, f"no bundle loaded: {self.load_error}")

    def _sync_blocklist(self, rec: Recommender) -> None:
        if self._blocklist is None:
            return
        try:
            mtime = self._blocklist.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime != self._blocklist_seen:
            data = json.loads(self._blocklist.read_text())
            rec.set_blocked(data["blocked_items"], data["blocked_creators"])
            self._blocklist_seen = mtime

    def _publish_blocklist(self, state: dict[str, Any]) -> None:
        if self._blocklist is None:
            return
        tmp = self._blocklist.with_name(f".blocklist.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: state[k] for k in ("blocked_items", "blocked_creators")}))
        tmp.replace(self._blocklist)  # atomic: a reader sees the old or the new list, never half of one
        self._blocklist_seen = self._blocklist.stat().st_mtime_ns

    def _call(self, endpoint: str, t0: float, fn: Any) -> tuple[Recommender | None, Any]:
        """Run ``fn(recommender)`` with the shared request prologue: readiness, blocklist sync, client errors.
        Returns (recommender, result), or (None, error response)."""
        rec = self.recommender
        if rec is None:
            return None, self._unavailable()
        self._sync_blocklist(rec)
        try:
            return rec, fn(rec)
        except RequestError as e:
            self._observe(endpoint, t0, "client_error")
            return None, _error(e.status, str(e), e.field)

    def _observe(self, endpoint: str, t0: float, outcome: str) -> None:
        self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - t0)
        self.metrics.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    @bentoml.api(input_spec=RecommendRequest)
    async def recommend(self, user_id: str, k: int, scenario: str | None, exclude_item_ids: list[str],
                        context: dict[str, ContextValue] | None, seen_item_ids: list[str]) -> RecommendResponse:
        """Top-k feed for a user: FAISS retrieval, ONNX ranking, scenario fusion and the feed policy."""
        # Async on purpose: the work is ~1-3 ms of ONNX / FAISS / numpy, cheaper to run on the event loop
        # than to hop to a worker thread (measured: p50 3.0 -> 2.2 ms, c=8 throughput +50 %).
        t0 = time.perf_counter()
        rec, r = self._call("recommend", t0, lambda rec: rec.recommend(user_id, k, scenario, exclude_item_ids, context,
                                                                                seen_item_ids))
        if rec is None:
            return r  # type: ignore[return-value]
        m = self.metrics
        m.candidates.observe(r.candidates)
        for stage, ms in r.timings_ms.items():
            m.stage.labels(stage=stage).observe(ms / 1e3)
        if r.cold_start:
            m.cold_start.inc()
        m.gini.set(rec.exposure.current_gini)
        m.boost.set(rec.exposure.boost)
        self._observe("recommend", t0, "ok")
        return _body(r)  # type: ignore[return-value]

    @bentoml.api(input_spec=RankRequest)
    async def rank(self, user_id: str, item_ids: list[str], scenario: str | None,
                   context: dict[str, ContextValue] | None) -> RankResponse:
        """Score given items for a user (governance and fusion; unknown and filtered ids are reported)."""
        t0 = time.perf_counter()
        rec, r = self._call("rank", t0, lambda rec: rec.rank(user_id, item_ids, scenario, context))
        if rec is None:
            return r  # type: ignore[return-value]
        self._observe("rank", t0, "ok")
        return _body(r, unknown_item_ids=r.unknown_item_ids, filtered_item_ids=r.filtered_item_ids)  # type: ignore[return-value]

    @bentoml.api(route="/bundle")
    def bundle_info(self) -> dict[str, Any]:
        """The bundle being served (version, source, heads, scenarios), or why none is."""
        rec = self.recommender
        if rec is None:
            return {"loaded": False, "error": self.load_error, "source": self.source}
        return {"loaded": True, "source": self.source, **rec.bundle.describe(), "exposure_gini": rec.exposure.current_gini,
                "exposure_pages": rec.exposure.pages, "exposure_shared": rec.exposure.store is not None}

    # ------------------------------------------------------------------ admin

    def _check_token(self, ctx: bentoml.Context) -> JSONResponse | None:
        expected = (self.recommender.settings.serving.token() if self.recommender is not None
                    else os.environ.get("FEEDSTACK_ADMIN_TOKEN"))
        if not expected:
            return _error(403, "admin endpoints are disabled: set FEEDSTACK_ADMIN_TOKEN or serving.admin_token", ctx=ctx)
        headers = ctx.request.headers
        given = headers.get("x-admin-token") or ""
        auth = headers.get("authorization") or ""
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given or not hmac.compare_digest(given.encode(), expected.encode()):
            return _error(401, "admin token missing or wrong (header 'Authorization: Bearer <token>' or 'X-Admin-Token')",
                          ctx=ctx)
        return None

    @bentoml.api(route="/admin/block", input_spec=BlockRequest)
    def admin_block(self, item_ids: list[str], creator_ids: list[str], unblock: bool, ctx: bentoml.Context) -> dict[str, Any]:
        """Block (or unblock) items and creators; takes effect for the next request."""
        denied = self._check_token(ctx)
        if denied is not None:
            return denied  # type: ignore[return-value]
        if self.recommender is None:
            return _error(503, f"no bundle loaded: {self.load_error}", ctx=ctx)  # type: ignore[return-value]
        self._sync_blocklist(self.recommender)  # build on what other workers published
        state = self.recommender.block(item_ids, creator_ids, unblock)
        self._publish_blocklist(state)
        return state

    @bentoml.api(route="/admin/reload", input_spec=ReloadRequest)
    async def admin_reload(self, bundle: str | None, ctx: bentoml.Context) -> dict[str, Any]:
        """Load, verify and swap in a bundle without a restart; a bad bundle is refused, the old one keeps serving."""
        denied = self._check_token(ctx)
        if denied is not None:
            return denied  # type: ignore[return-value]
        if WORKERS > 1:  # the call reaches one process: the others would keep serving the old bundle
            return _error(409, f"reload reaches one of {WORKERS} worker processes; restart the service with the "
                               "new bundle (or run one worker) instead", "bundle", ctx)  # type: ignore[return-value]
        source = bundle or self.source
        old = self.recommender
        previous = old.bundle.version if old is not None else None
        try:
            if old is not None:
                # Off the request thread pool: /recommend keeps being answered while the bundle loads.
                info = await anyio.to_thread.run_sync(old.reload, source)
                new_version = old.bundle.version
            else:
                self.recommender = await anyio.to_thread.run_sync(self._load, source)
                info = self.recommender.bundle.describe()
                new_version = self.recommender.bundle.version
        except (BundleError, OSError, ValueError) as e:
            self.metrics.reloads.labels(outcome="refused").inc()
            serving = old.bundle.version if old is not None else None
            return _error(422, f"bundle refused: {e}; still serving {serving}", "bundle", ctx)  # type: ignore[return-value]
        self.metrics.reloads.labels(outcome="ok").inc()
        self.metrics.set_bundle(new_version, previous)
        self.source = source
        self.load_error = None
        return {"reloaded": True, "source": source, **info}
