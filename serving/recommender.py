"""The request path as a plain class: retrieval (ONNX user tower + FAISS), ranking (ONNX), the feed policy,
governance state (blocks) and bundle reload. The BentoML service only translates HTTP to these calls.

Thread-safety: a request reads ``self.state`` once; admin changes build a new state object and swap
the reference, so a request never sees half of a change.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from serving.bundle import DAY_MS, Bundle, load_bundle, resolve_bundle
from serving.candidates import CHANNEL_REASONS, SeenMemory, available_channels, channel_quotas, merge_for_user
from serving.config import ServeSettings
from serving.exposure import ExposureTracker, creator_groups, least_exposed_pool, pool_candidates
from serving.policy import Candidates, FeedPolicy, fuse, retrieval_weight, with_affinity
from serving.results import RequestError, Result, ScoredItem


@dataclass
class ServingState:
    bundle: Bundle
    policy: FeedPolicy
    servable: np.ndarray  # (N,) bool: visible and not blocked (item or creator)
    blocked_items: frozenset[str]
    blocked_creators: frozenset[str]
    # The exposure candidate pool: (tracker refresh step it was built at, catalogue rows, their vectors).
    pool: tuple[int, np.ndarray, np.ndarray] | None = None
    by_creator: tuple[np.ndarray, np.ndarray] | None = None  # servable rows sorted by creator, CSR pointers


def _servable(b: Bundle, items: frozenset[str], creators: frozenset[str]) -> np.ndarray:
    mask = b.visible.copy()
    if items:
        rows = [b.item_row[i] for i in items if i in b.item_row]
        mask[rows] = False
    if creators:
        cmask = np.isin(b.creator_ids, list(creators))
        mask &= ~cmask[b.item_creator]
    return mask


class Recommender:
    def __init__(self, bundle: Bundle, settings: ServeSettings, exposure_store: str | Path | None = None):
        """``exposure_store``: a file for the creator-exposure state shared by several worker processes
        (default: this process's memory)."""
        self.settings = settings
        gov = settings.policy.governance
        self._admin_lock = threading.RLock()  # block() calls set_blocked() under it
        self.state = self._make_state(bundle, frozenset(gov.blocked_items), frozenset(gov.blocked_creators))
        self.exposure = ExposureTracker(len(bundle.creator_ids), settings.policy.exposure_control,
                                        self._eligible_creators(self.state), store=exposure_store)
        s = settings.serving
        self.seen_memory = SeenMemory(s.seen_window_s, s.seen_max_users, s.seen_max_items)
        self._configure_threads()
        self._vectors: tuple[Any, np.ndarray] | None = None  # (bundle, (N, d) item vectors), loaded lazily
        self._warm_exposure_pool(bundle)

    # ------------------------------------------------------------------ construction and admin

    @classmethod
    def from_source(cls, source: str, settings: ServeSettings) -> "Recommender":
        s = settings.serving
        path, version = resolve_bundle(source, s.download_dir, s.tracking_uri)
        return cls(load_bundle(path, registry_version=version, onnx_threads=s.onnx_threads), settings)

    def _configure_threads(self) -> None:
        import faiss

        faiss.omp_set_num_threads(self.settings.serving.faiss_threads)

    def _make_state(self, bundle: Bundle, items: frozenset[str], creators: frozenset[str]) -> ServingState:
        policy = FeedPolicy(self.settings.policy, bundle.heads, bundle.ranking.scenarios, bundle.page_retrieval_weight)
        return ServingState(bundle, policy, _servable(bundle, items, creators), items, creators)

    @staticmethod
    def _eligible_creators(st: ServingState) -> np.ndarray:
        b = st.bundle
        eligible = np.zeros(len(b.creator_ids), dtype=bool)
        eligible[b.item_creator[st.servable]] = True
        return eligible

    @property
    def bundle(self) -> Bundle:
        return self.state.bundle

    @property
    def scenarios(self) -> list[str]:
        return self.state.policy.scenarios

    def block(self, item_ids: Sequence[str] = (), creator_ids: Sequence[str] = (), unblock: bool = False) -> dict[str, Any]:
        with self._admin_lock:
            st = self.state
            items, creators = set(st.blocked_items), set(st.blocked_creators)
            if unblock:
                items -= set(item_ids)
                creators -= set(creator_ids)
            else:
                items |= set(item_ids)
                creators |= set(creator_ids)
            return self.set_blocked(items, creators)

    def set_blocked(self, items: Sequence[str] | set[str], creators: Sequence[str] | set[str]) -> dict[str, Any]:
        """Replace the whole blocklist (what another worker published, or what block() computed)."""
        items, creators = set(items), set(creators)
        with self._admin_lock:
            st = self.state
            new = ServingState(st.bundle, st.policy, _servable(st.bundle, frozenset(items), frozenset(creators)),
                         frozenset(items), frozenset(creators))
            self.state = new
            self.exposure.eligible = self._eligible_creators(new)
        return {"blocked_items": sorted(new.blocked_items), "blocked_creators": sorted(new.blocked_creators),
                "servable_items": int(new.servable.sum())}

    def reload(self, source: str) -> dict[str, Any]:
        """Load, verify and swap in a bundle; on any problem raise BundleError and keep the old one."""
        return self.swap(self.load(source))

    def load(self, source: str) -> Bundle:
        """Resolve and load a bundle with this recommender's settings (nothing is swapped)."""
        s = self.settings.serving
        path, version = resolve_bundle(source, s.download_dir, s.tracking_uri)
        return load_bundle(path, registry_version=version, onnx_threads=s.onnx_threads)

    def swap(self, bundle: Bundle) -> dict[str, Any]:
        """Serve ``bundle`` from the next request on, keeping the blocklist and the creator exposure."""
        self._warm_exposure_pool(bundle)
        with self._admin_lock:
            old = self.state
            new = self._make_state(bundle, old.blocked_items, old.blocked_creators)
            self.exposure = self.exposure.remap(old.bundle.creator_ids, bundle.creator_ids, self._eligible_creators(new))
            self.state = new
        return bundle.describe()

    # ------------------------------------------------------------------ request path

    def scenario_name(self, st: ServingState, scenario: str | None) -> str:
        name = scenario or self.settings.serving.default_scenario
        if name not in st.policy.weights:
            if scenario is None:  # the configured default is absent from this bundle: take its first
                return st.policy.scenarios[0]
            raise RequestError("scenario", f"scenario: unknown scenario '{name}'; known: {st.policy.scenarios}")
        return name

    def user_lookup(self, b: Bundle, user_id: str) -> tuple[int, np.ndarray]:
        row = b.user_row.get(user_id, -1)
        hist = b.history[row] if row >= 0 else np.zeros(b.history.shape[1], np.int64)
        return row, hist

    def _user_vector(self, b: Bundle, row: int, hist: np.ndarray) -> np.ndarray:
        feeds = {}
        for inp in b.retrieval.user_tower.inputs:
            dtype = np.float32 if "float" in inp.dtype else np.int64
            if inp.columns == [b.history_column]:
                feeds[inp.name] = hist.reshape(1, -1).astype(dtype)
            elif row >= 0:
                feeds[inp.name] = np.array([[b.user_cols[c][row] for c in inp.columns]], dtype=dtype)
            else:  # unknown user: every attribute at its OOV / default value
                feeds[inp.name] = np.zeros((1, len(inp.columns)), dtype=dtype)
        out = b.user_tower.run([b.retrieval.user_tower.output.name], feeds)[0]
        return np.ascontiguousarray(out, dtype=np.float32).reshape(1, -1)

    def retrieve(self, user_id: str, n: int) -> np.ndarray:
        """Retrieval rows for a user, with no policy and no exposure bookkeeping (health checks)."""
        st = self.state
        row, hist = self.user_lookup(st.bundle, user_id)
        return self.search(st, row, hist, n)[0]

    def query_vector(self, b: Bundle, row: int, hist: np.ndarray) -> np.ndarray | None:
        """The user's served query vector, or None on the popular cold-start path (an unknown user with
        ``serving.cold_start: popular``)."""
        if row < 0 and self.settings.serving.cold_start == "popular":
            return None
        return self._user_vector(b, row, hist)

    def search(self, st: ServingState, row: int, hist: np.ndarray, n: int) -> tuple[np.ndarray, bool, np.ndarray | None]:
        """Retrieval top-``n`` rows, cold flag, and the user vector (None for the popular cold-start path)."""
        b = st.bundle
        cold = row < 0
        vec = self.query_vector(b, row, hist)
        if vec is None:
            pop = b.popular[st.servable[b.popular]]
            return pop[:n], True, None
        _, ids = b.index.search(vec, min(n, b.n_items))
        ids = ids[0]
        return ids[ids >= 0].astype(np.int64), cold, vec

    def _warm_exposure_pool(self, bundle: Bundle) -> None:
        """Load the item vectors up front when a scenario uses exposure candidates or the retrieval score in its
        fusion (not on a request)."""
        p = self.settings.policy
        if any(p.for_scenario(s).exposure.candidate_slots > 0
               or retrieval_weight(p.for_scenario(s), bundle.page_retrieval_weight) > 0
               for s in bundle.ranking.scenarios):
            self._item_vectors(bundle)

    def _item_vectors(self, b: Bundle) -> np.ndarray:
        cached = self._vectors
        if cached is not None and cached[0] is b:
            return cached[1]
        path = b.path / "retrieval" / "item_vectors.npy"
        if b.item_vectors is not None:
            vecs = b.item_vectors
        elif path.exists():
            vecs = np.load(path)
        else:
            vecs = b.index.reconstruct_n(0, b.n_items)
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        self._vectors = (b, vecs)
        return vecs

    def _exposure_pool(self, st: ServingState) -> tuple[np.ndarray, np.ndarray]:
        """The exposure pool's rows and vectors, rebuilt every ``update_every`` pages of the tracker."""
        tracker = self.exposure
        step = tracker.pages // tracker.control.update_every
        pool = st.pool
        if pool is not None and pool[0] == step:
            return pool[1], pool[2]
        b = st.bundle
        if st.by_creator is None:  # once per state (blocks make a new one)
            st.by_creator = creator_groups(st.servable, b.item_creator, len(b.creator_ids))
        rows = least_exposed_pool(tracker, st.by_creator)
        vecs = self._item_vectors(b)[rows]
        # Publish on the state object the request read (a state swap discards it, so blocks apply at once).
        st.pool = (step, rows, vecs)
        return rows, vecs

    def exposure_candidates(self, st: ServingState, vec: np.ndarray | None, rows: np.ndarray, scenario: str) -> np.ndarray:
        """Up to ``exposure.candidate_slots`` pool items (one per creator) not in ``rows``, best for ``vec``."""
        steps = self.settings.policy.for_scenario(scenario)
        slots = steps.exposure.candidate_slots if steps.exposure.enabled else 0
        if slots <= 0 or vec is None:
            return np.zeros(0, np.int64)
        pool_rows, pool_vecs = self._exposure_pool(st)
        return pool_candidates(pool_rows, pool_vecs, vec, rows, st.bundle.item_creator, st.servable, slots)

    def _context_codes(self, b: Bundle, context: dict[str, Any] | None) -> list[tuple[int, int]]:
        ctx = context or {}
        out = []
        for pos, name in b.request_cat:
            if name == "user_id":
                continue  # filled per request from the user id
            if name in ctx:
                value = ctx[name]
            elif name == "hour":
                now_ms = time.time() * 1000 if self.settings.serving.hour_from == "now" else b.data_end_ms
                value = int(((now_ms / 3_600_000) + b.utc_offset_hours) % 24)
            else:
                value = None
            out.append((pos, b.vocab_maps[name].get(str(value), 0) if value is not None else 0))
        return out

    def _rank(self, b: Bundle, user_id: str, row: int, hist: np.ndarray, rows: np.ndarray,
              context: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(n, T) head predictions for catalogue rows ``rows``, and (n,) expected watch time in ms (or None)."""
        k = b.ranking
        cat, num = self.ranker_inputs(b, user_id, row, rows, context)
        hist_mat = np.ascontiguousarray(np.broadcast_to(hist, (len(rows), len(hist))))
        outputs = [k.scores.name] + ([k.watch_time.name] if k.watch_time else [])
        out = b.ranker.run(outputs, {k.cat.name: cat, k.hist.name: hist_mat, k.num.name: num})
        # The ranker emits watch time in seconds (float32 ms would lose the parity tolerance to rounding).
        watch_ms = np.asarray(out[1], dtype=np.float64).reshape(-1) * 1000.0 if k.watch_time else None
        return np.asarray(out[0], dtype=np.float32), watch_ms

    def ranker_inputs(self, b: Bundle, user_id: str, row: int, rows: np.ndarray,
                      context: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
        """The ranker's ``cat`` (n, C) and ``num`` (n, N) inputs for catalogue rows ``rows`` (sources in
        ``ranking.json`` order), from the bundle's tables."""
        n = len(rows)
        k = b.ranking
        cat = np.zeros((n, len(k.cat.sources)), dtype=np.int64)
        cat[:, b.item_cat_pos] = b.item_cat[rows]
        if row >= 0 and len(b.user_cat_pos):
            cat[:, b.user_cat_pos] = np.array([b.user_cols[c][row] for c in b.user_cat_cols], dtype=np.int64)
        for pos, name in b.request_cat:
            if name == "user_id":
                cat[:, pos] = b.vocab_maps["user_id"].get(user_id, 0)
        for pos, code in self._context_codes(b, context):
            cat[:, pos] = code
        num = np.zeros((n, len(k.num.sources)), dtype=np.float32)
        num[:, b.item_num_pos] = b.item_num[rows]
        if len(b.user_num_pos):
            num[:, b.user_num_pos] = (np.array([b.user_cols[c][row] for c in b.user_num_cols], dtype=np.float32)
                                      if row >= 0 else np.nan)
        if row >= 0 and len(b.fan_num_pos):
            lo, hi = b.fan_ptr[row], b.fan_ptr[row + 1]
            if hi > lo:
                codes = b.fan_creator[lo:hi]
                cand = b.item_creator[rows]
                pos = np.minimum(np.searchsorted(codes, cand), len(codes) - 1)
                hit = codes[pos] == cand
                if hit.any():
                    vals = b.fan_values[lo:hi][pos[hit]]
                    num[np.ix_(np.flatnonzero(hit), b.fan_num_pos)] = vals[:, b.fan_num_which]
        if b.behaviour is not None:
            b.behaviour.fill(num, row, rows, b.item_creator, context)
        return cat, num

    def score(self, b: Bundle, user_id: str, row: int, hist: np.ndarray, rows: np.ndarray,
               context: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray | None]:
        if not len(rows):
            return np.zeros((0, len(b.heads)), np.float32), None
        return self._rank(b, user_id, row, hist, rows, context)

    def candidates(self, st: ServingState, row: int, hist: np.ndarray, rows: np.ndarray, preds: np.ndarray,
                    scenario: str, excluded: np.ndarray | None) -> Candidates:
        b = st.bundle
        allowed = st.servable[rows]
        if excluded is not None and len(excluded):
            allowed &= ~np.isin(rows, excluded)
        creator = b.item_creator[rows]
        steps = self.settings.policy.for_scenario(scenario)
        fan_fresh = np.zeros(len(rows), dtype=bool)
        if row >= 0 and steps.fans_first.enabled and "is_iron_fan" in b.fan_columns:
            lo, hi = b.fan_ptr[row], b.fan_ptr[row + 1]
            if hi > lo:
                iron = b.fan_creator[lo:hi][b.fan_values[lo:hi, b.fan_columns.index("is_iron_fan")] > 0]
                fan_fresh = np.isin(creator, iron)
                days = steps.fans_first.fresh_days
                if days is not None and fan_fresh.any():
                    ref = b.data_end_ms if self.settings.serving.fresh_reference == "bundle" else time.time() * 1000
                    up = b.upload_ts[rows]
                    fan_fresh &= np.isnan(up) | (up >= ref - days * DAY_MS)
        seen = b.idx_category[hist[(hist > 0) & (hist < len(b.idx_category))]]
        category = b.item_category[rows]
        return Candidates(creator=creator, category=category, preds=preds, allowed=allowed,
                          high_quality=b.high_quality[rows], fan_fresh=fan_fresh,
                          new_category=~np.isin(category, seen))

    def affinity(self, st: ServingState, scenario: str, vec: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
        """The candidates' retrieval scores (user vector . item vector) when the scenario's fusion weighs them,
        else None (no user vector: the popular cold start)."""
        if vec is None or st.policy.fusion_retrieval_weight(self.settings.policy.for_scenario(scenario)) <= 0:
            return None
        return self._item_vectors(st.bundle)[rows] @ vec[0]

    def _items(self, b: Bundle, rows: np.ndarray, preds: np.ndarray, scores: np.ndarray,
               reasons: list[list[str]], watch_ms: np.ndarray | None) -> list[ScoredItem]:
        heads = b.heads
        creators = b.creator_ids[b.item_creator[rows]]
        ids = b.item_ids[rows]
        return [ScoredItem(str(ids[j]), str(creators[j]), float(scores[j]), dict(zip(heads, preds[j].tolist())),
                           reasons[j], None if watch_ms is None else round(float(watch_ms[j]), 1))
                for j in range(len(rows))]

    def _blocked(self, st: ServingState, user_id: str, row: int, exclude_item_ids: Sequence[str],
                 seen_item_ids: Sequence[str]) -> tuple[np.ndarray, int]:
        """(N,) mask of rows never to serve this request (not servable, excluded, seen) and how many of
        them are the user's own (excluded or seen), which the ANN search must reach past."""
        b = st.bundle
        ids = list(exclude_item_ids)
        mine = [b.item_row[i] for i in ids if i in b.item_row]
        if self.settings.serving.exclude_seen:
            remembered = self.seen_memory.add_and_get(user_id, seen_item_ids)
            mine += [b.item_row[i] for i in remembered if i in b.item_row]
            if b.channels is not None and row >= 0:
                mine += b.channels.seen_rows(row).tolist()
        blocked = ~st.servable
        if mine:
            blocked = blocked.copy()
            blocked[np.asarray(mine, np.int64)] = True
        return blocked, len(mine)

    def _merged(self, st: ServingState, row: int, hist: np.ndarray, blocked: np.ndarray,
                n_mine: int) -> tuple[np.ndarray, np.ndarray, bool, np.ndarray | None]:
        """Merged candidate rows, their channel reason index, cold flag and the user vector."""
        b = st.bundle
        s = self.settings.serving
        available = available_channels(b, s)
        has_mf = "mf" in available
        quotas = channel_quotas(s.channel_quotas, b.channel_quotas, s.candidates, available)
        # The ANN's share, or with the fill everything the other channels may leave.
        want = sum(quotas.values()) if s.fill_from_ann else quotas.get("ann", 0)
        n = want + n_mine
        while True:
            ann, cold, vec = self.search(st, row, hist, max(n, 1))
            mf = (vec[0, b.mf_dims[0]:b.mf_dims[1]], b.mf_items) if vec is not None and has_mf else None
            rows, tags = merge_for_user(b.channels, quotas, ann, hist, b.idx_to_row, blocked, mf, s.fill_from_ann)
            got = len(rows) if s.fill_from_ann else int((tags == 0).sum())
            # Non-servable items in the ANN's top cut what it adds: search wider once more.
            if got >= want or len(ann) < n or n >= b.n_items:
                return rows, tags, cold, vec
            n = min(2 * n + 10, b.n_items)

    def recommend(self, user_id: str, k: int, scenario: str | None = None,
                  exclude_item_ids: Sequence[str] = (), context: dict[str, Any] | None = None,
                  seen_item_ids: Sequence[str] = ()) -> Result:
        st = self.state
        b = st.bundle
        name = self.scenario_name(st, scenario)
        t0 = time.perf_counter()
        row, hist = self.user_lookup(b, user_id)
        blocked, n_mine = self._blocked(st, user_id, row, exclude_item_ids, seen_item_ids)
        rows, tags, cold, vec = self._merged(st, row, hist, blocked, n_mine)
        extra = self.exposure_candidates(st, vec, rows, name)
        extra = extra[~blocked[extra]]
        n_retrieved = len(rows)
        if len(extra):
            rows = np.concatenate([rows, extra])
            tags = np.concatenate([tags, np.full(len(extra), CHANNEL_REASONS.index("channel:exposure"), np.int8)])
        t1 = time.perf_counter()
        preds, watch_ms = self.score(b, user_id, row, hist, rows, context)
        t2 = time.perf_counter()
        cands = self.candidates(st, row, hist, rows, preds, name, None)
        if len(extra):
            cands.exposure_pool = np.arange(len(rows)) >= n_retrieved
        cands.affinity = self.affinity(st, name, vec, rows)
        page = st.policy.page(cands, k, name, self.exposure)
        t3 = time.perf_counter()
        sel = rows[page.index]
        reasons = [r + [CHANNEL_REASONS[t]] for r, t in zip(page.reasons, tags[page.index].tolist())]
        items = self._items(b, sel, preds[page.index], page.score, reasons,
                            None if watch_ms is None else watch_ms[page.index])
        timings = {"retrieval": (t1 - t0) * 1e3, "ranking": (t2 - t1) * 1e3, "policy": (t3 - t2) * 1e3}
        return Result(items, b.version, name, cold, int(len(rows)), timings_ms=timings)

    def rank(self, user_id: str, item_ids: Sequence[str], scenario: str | None = None,
             context: dict[str, Any] | None = None) -> Result:
        """Score given candidates: governance, then fusion (no page policy: every allowed item comes back)."""
        st = self.state
        b = st.bundle
        name = self.scenario_name(st, scenario)
        seen: set[str] = set()
        unknown, filtered, keep = [], [], []
        for i in item_ids:
            if i in seen:
                continue
            seen.add(i)
            r = b.item_row.get(i, -1)
            if r < 0:
                unknown.append(i)
            elif not st.servable[r]:
                filtered.append(i)
            else:
                keep.append(r)
        rows = np.array(keep, dtype=np.int64)
        row, hist = self.user_lookup(b, user_id)
        preds, watch_ms = self.score(b, user_id, row, hist, rows, context)
        steps = self.settings.policy.for_scenario(name)
        score = fuse(preds, st.policy.weights[name], steps.fusion.mode)
        weight = st.policy.fusion_retrieval_weight(steps)
        if len(rows) > 1 and weight > 0:  # the page's fusion, as in recommend
            score = with_affinity(score, self.affinity(st, name, self.query_vector(b, row, hist), rows), weight)
        order = np.argsort(-score, kind="stable")
        items = self._items(b, rows[order], preds[order], score[order], [["relevance"] for _ in order],
                            None if watch_ms is None else watch_ms[order])
        return Result(items, b.version, name, row < 0, len(rows), unknown, filtered)
