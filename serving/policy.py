"""The feed policy: what turns ranked candidates into a page. Plain numpy, no HTTP, no bundle.

Used by the service (:class:`serving.recommender.Recommender`) and by the offline evaluator
(:mod:`serving.offline`). Steps, in order, each configurable per scenario and each leaving a reason tag on
the items it placed:

1. governance   blocked items / creators and non-visible items are removed first (no tag: never served)
2. fusion       final score = weighted sum of head predictions (or a product of powers); hate weighs < 0
3. fans_first   fresh items of creators the user is an iron fan of take the first slots       -> "fan"
4. quality      at least ``min_share`` of the page comes from high-quality creators           -> "quality_support"
5. exposure     under-exposed creators get a score boost (over-exposed ones a penalty, ``demote``);
                the strength is steered so the Gini of creator exposure stays under
                ``gini_target``; ``placement: relevance`` lays the chosen page out by fused score -> "exposure_boost"
                (the recommender also adds ``candidate_slots`` items of under-exposed creators to the
                candidates; placed ones carry the same tag)
6. diversity    at most ``max_per_creator`` items per creator; a category is not repeated within
                ``category_window`` consecutive slots
7. exploration  ``slots`` items of categories the user has not engaged with                   -> "exploration"

Items placed on score alone carry "relevance". The steps' settings are :mod:`serving.policy_config`;
creator exposure lives in :class:`serving.exposure.ExposureTracker` (exponentially decaying counts, one
per creator), owned by the caller so that one tracker can follow a whole service or a whole offline run.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from features.config import ConfigError
from serving.exposure import ExposureTracker
from serving.policy_config import PolicyConfig

REASONS = ("relevance", "fan", "quality_support", "exposure_boost", "exploration")


def fuse(preds: np.ndarray, weights: np.ndarray, mode: str = "sum") -> np.ndarray:
    """preds (n, T) head predictions in [0, 1], weights (T,) -> (n,) fused score."""
    if mode == "sum":
        return preds @ weights
    return np.exp(np.log(np.clip(preds, 1e-6, 1.0)) @ weights)


@dataclass
class Candidates:
    """One request's ranked candidates, aligned arrays of length n (after retrieval and ranking)."""

    creator: np.ndarray  # (n,) int64 creator code (0..C-1)
    category: np.ndarray  # (n,) int64 category code
    preds: np.ndarray  # (n, T) float32 head predictions
    allowed: np.ndarray  # (n,) bool: visible, not blocked, not excluded (governance input)
    high_quality: np.ndarray  # (n,) bool creator is high-quality
    fan_fresh: np.ndarray  # (n,) bool user is an iron fan of the creator and the item is fresh
    new_category: np.ndarray  # (n,) bool the user has not engaged with this category
    exposure_pool: np.ndarray | None = None  # (n,) bool added by the exposure candidate step (None = none)


@dataclass
class Page:
    index: np.ndarray  # (k',) positions into the candidates, in page order
    score: np.ndarray  # (k',) final score (fused + exposure boost)
    fused: np.ndarray  # (k',) fused score alone
    reasons: list[list[str]]
    stats: dict[str, Any]


class FeedPolicy:
    """Turns candidates into a page. ``heads`` is the bundle's head order; ``scenarios`` its fusion weights."""

    def __init__(self, config: PolicyConfig, heads: list[str], scenarios: dict[str, dict[str, float]]):
        self.config = config
        self.heads = list(heads)
        self.weights: dict[str, np.ndarray] = {}
        for name, w in scenarios.items():
            steps = config.for_scenario(name)
            merged = {**w, **steps.fusion.weights}
            unknown = sorted(set(merged) - set(self.heads))
            if unknown:
                raise ConfigError(f"fusion weights of scenario '{name}' name unknown heads {unknown}; heads: {self.heads}")
            self.weights[name] = np.array([merged.get(h, 0.0) for h in self.heads], dtype=np.float32)
        for name in config.scenarios:
            if name not in self.weights:
                raise ConfigError(f"policy.scenarios.{name}: no such scenario in the bundle; known: {sorted(self.weights)}")

    @property
    def scenarios(self) -> list[str]:
        return sorted(self.weights)

    @staticmethod
    def _fill(order: list[int], category: list[int], n_fill: int, window: int, can_take, take,
              recent: list[int]) -> list[int]:
        body: list[int] = []
        deferred: dict[int, deque[int]] = {}  # category -> ranks (positions in ``order``) waiting
        heap: list[tuple[int, int]] = []  # (rank of the queue's head, category), one entry per non-empty queue
        scan = 0

        def pop_head(cat: int) -> None:
            q = deferred[cat]
            q.popleft()
            if q:
                heapq.heappush(heap, (q[0], cat))

        while len(body) < n_fill:
            chosen = -1
            stash = []
            while heap:  # a deferred item outranks anything still unscanned
                r, cat = heap[0]
                if not can_take(order[r]):
                    heapq.heappop(heap)
                    pop_head(cat)
                elif cat in recent:
                    stash.append(heapq.heappop(heap))
                else:
                    heapq.heappop(heap)
                    pop_head(cat)
                    chosen = order[r]
                    break
            for e in stash:
                heapq.heappush(heap, e)
            while chosen < 0 and scan < len(order):
                i, r = order[scan], scan
                scan += 1
                if not can_take(i):
                    continue
                if window and category[i] in recent:
                    q = deferred.setdefault(category[i], deque())
                    q.append(r)
                    if len(q) == 1:
                        heapq.heappush(heap, (r, category[i]))
                    continue
                chosen = i
            while chosen < 0 and heap:  # only repeats left: relax the window, best first
                r, cat = heapq.heappop(heap)
                pop_head(cat)
                if can_take(order[r]):
                    chosen = order[r]
            if chosen < 0:
                break
            take(chosen, "relevance")
            body.append(chosen)
            if window:
                recent.append(category[chosen])
                del recent[:-window]
        return body

    def page(self, c: Candidates, k: int, scenario: str, exposure: ExposureTracker | None = None) -> Page:
        steps = self.config.for_scenario(scenario)
        keep = np.flatnonzero(c.allowed)  # 1. governance: nothing else ever sees a filtered item
        n = len(keep)
        creator, category = c.creator[keep], c.category[keep]
        fused = fuse(c.preds[keep].astype(np.float32), self.weights[scenario], steps.fusion.mode)  # 2. fusion
        score = fused.astype(np.float64)
        boosted = np.zeros(n, dtype=bool)
        if exposure is not None and steps.exposure.enabled and steps.exposure.strength > 0 and n > 1:  # 5.
            spread = float(fused.std()) or 1.0
            adjust = exposure.under_exposure(creator)
            if steps.exposure.demote > 0:
                adjust = adjust - steps.exposure.demote * exposure.over_exposure(creator)
            bonus = exposure.boost * steps.exposure.strength * spread * adjust
            score = score + bonus
            boosted = bonus > 0
        order_np = np.argsort(-score, kind="stable")
        order = order_np.tolist()
        k = min(k, n)
        cre = creator.tolist()
        cat_l = category.tolist()
        taken: set[int] = set()
        per_creator: dict[int, int] = {}
        cap = steps.diversity.max_per_creator if steps.diversity.enabled else n
        reasons: dict[int, str] = {}

        def can_take(i: int) -> bool:
            return i not in taken and per_creator.get(cre[i], 0) < cap

        def take(i: int, why: str) -> None:
            taken.add(i)
            per_creator[cre[i]] = per_creator.get(cre[i], 0) + 1
            reasons[i] = why

        def release(i: int) -> None:
            taken.discard(i)
            per_creator[cre[i]] -= 1
            reasons.pop(i, None)

        # 3. fans-first: the best fresh items of iron-fan creators, at the top.
        head: list[int] = []
        if steps.fans_first.enabled and steps.fans_first.slots > 0:
            for i in order_np[c.fan_fresh[keep][order_np]].tolist():
                if len(head) >= min(steps.fans_first.slots, k):
                    break
                if can_take(i):
                    take(i, "fan")
                    head.append(i)
        # 7. exploration (chosen before the fill so the fill cannot use up the creator cap).
        explore: list[int] = []
        n_explore = min(steps.exploration.slots, k - len(head)) if steps.exploration.enabled else 0
        if n_explore > 0:
            seen_cats: set[int] = set()
            for i in order_np[c.new_category[keep][order_np]].tolist():
                if len(explore) >= n_explore:
                    break
                if cat_l[i] not in seen_cats and can_take(i):
                    take(i, "exploration")
                    explore.append(i)
                    seen_cats.add(cat_l[i])
        # 6. diversity fill, greedy in score order under the creator cap; an item whose category is among
        # the last `window` placed is deferred (per-category queues, heads in a heap keyed by score rank)
        # and placed as soon as its category is allowed again, before any lower-ranked item.
        window = steps.diversity.category_window if steps.diversity.enabled else 0
        lead = [cat_l[i] for i in head][-window:] if window else []
        body = self._fill(order, cat_l, k - len(head) - len(explore), window, can_take, take, list(lead))
        if steps.exposure.placement == "relevance" and boosted.any() and len(body) > 1:
            # Same items, laid out again by fused score under the same category window.
            chosen = set(body)
            by_fused = sorted(body, key=lambda i: (-fused[i], i))  # the page's k items only, ties by position
            body = self._fill(by_fused, cat_l, len(body), window, lambda i: i in chosen, lambda i, why: chosen.discard(i),
                              list(lead))
        # 4. quality support: swap the lowest body items for the best unused high-quality ones.
        hq = c.high_quality[keep]
        if steps.quality.enabled and steps.quality.min_share > 0 and k > 0:
            need = math.ceil(steps.quality.min_share * k - 1e-9)
            have = int(hq[head + explore + body].sum()) if k else 0
            if have < need:
                pos = len(body) - 1
                for cand in order_np[hq[order_np]].tolist():
                    if have >= need:
                        break
                    if cand in taken:
                        continue
                    while pos >= 0 and hq[body[pos]]:
                        pos -= 1
                    if pos < 0:
                        break
                    old = body[pos]
                    release(old)
                    if can_take(cand):
                        take(cand, "quality_support")
                        body[pos] = cand
                        have += 1
                        pos -= 1
                    else:  # creator cap: put the old item back and try the next candidate
                        take(old, "relevance")
        # Assemble: fan slots, then the body with exploration items spread evenly through it.
        final = list(head)
        total = len(body) + len(explore)
        slots = {round((j + 1) * total / (len(explore) + 1)) for j in range(len(explore))}
        rest_body, rest_explore = list(body), list(explore)
        for p in range(total):
            if rest_explore and (p in slots or not rest_body):
                final.append(rest_explore.pop(0))
            else:
                final.append(rest_body.pop(0))
        idx = np.array(final, dtype=np.int64)
        # Items whose boost lifted them into the page past a better-fused item are tagged as such.
        tags: list[list[str]] = []
        pool = c.exposure_pool[keep] if c.exposure_pool is not None else None
        if boosted.any() and len(idx):
            fused_rank = np.empty(n, dtype=np.int64)
            fused_rank[np.argsort(-fused, kind="stable")] = np.arange(n)
            cutoff = len(idx)
        for i in idx.tolist():
            t = [reasons[i]]
            if (boosted[i] and fused_rank[i] >= cutoff) or (pool is not None and pool[i]):
                t.append("exposure_boost")
            tags.append(t)
        if exposure is not None:
            exposure.record(creator[idx])
        stats = {"candidates": int(len(c.allowed)), "filtered": int(len(c.allowed) - n),
                 "boost": float(exposure.boost) if exposure is not None else 0.0}
        return Page(keep[idx], score[idx], fused[idx].astype(np.float64), tags, stats)
