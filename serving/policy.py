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
from serving.policy_config import PolicyConfig, PolicySteps

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
    affinity: np.ndarray | None = None  # (n,) retrieval score, user vector . item vector (None: no user vector)


@dataclass
class Page:
    index: np.ndarray  # (k',) positions into the candidates, in page order
    score: np.ndarray  # (k',) final score (fused + exposure boost)
    fused: np.ndarray  # (k',) fused score alone
    reasons: list[list[str]]
    stats: dict[str, Any]


class FeedPolicy:
    """Turns candidates into a page. ``heads`` is the bundle's head order; ``scenarios`` its fusion weights."""

    def __init__(self, config: PolicyConfig, heads: list[str], scenarios: dict[str, dict[str, float]],
                 retrieval_weight: float = 0.0):
        self.config = config
        self.retrieval_weight = retrieval_weight  # the bundle's, where policy.fusion.retrieval_weight is null
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
        """The page of ``k`` items. Each step is one function below. They run in the order their inputs
        allow, which is not DESIGN.md's numbering (a precedence order): the exposure boost (5) reorders the
        candidates every later step picks from; fans-first (3) and exploration (7) reserve their slots before
        the diversity fill (6), so the fill cannot spend the creator cap on them; quality support (4) swaps
        the lowest filled items last, under the same cap."""
        steps = self.config.for_scenario(scenario)
        keep = np.flatnonzero(c.allowed)  # 1. governance: nothing else ever sees a filtered item
        creator, category = c.creator[keep], c.category[keep]
        fused = fuse(c.preds[keep].astype(np.float32), self.weights[scenario], steps.fusion.mode)  # 2. fusion
        fused = with_affinity(fused, None if c.affinity is None else c.affinity[keep], self.fusion_retrieval_weight(steps))
        score, boosted = _exposure_boost(steps, fused, creator, exposure)  # 5. exposure fairness
        order = np.argsort(-score, kind="stable")
        k = min(k, len(keep))
        b = _PageBuild(creator, category, steps.diversity.max_per_creator if steps.diversity.enabled else len(keep))
        head = b.fans_first(order, c.fan_fresh[keep], steps, k)  # 3
        explore = b.exploration(order, c.new_category[keep], steps, k - len(head))  # 7
        body = b.diversity_fill(order, fused, boosted, steps, k - len(head) - len(explore), head)  # 6
        b.quality_support(order, c.high_quality[keep], steps, k, head + explore, body)  # 4
        idx = np.array(_spread(head, body, explore), dtype=np.int64)
        pool = c.exposure_pool[keep] if c.exposure_pool is not None else None
        tags = b.tags(idx, fused, boosted, pool)
        if exposure is not None:
            exposure.record(creator[idx])
        stats = {"candidates": int(len(c.allowed)), "filtered": int(len(c.allowed) - len(keep)),
                 "boost": float(exposure.boost) if exposure is not None else 0.0}
        return Page(keep[idx], score[idx], fused[idx].astype(np.float64), tags, stats)

    def fusion_retrieval_weight(self, steps: PolicySteps) -> float:
        return retrieval_weight(steps, self.retrieval_weight)


def retrieval_weight(steps: PolicySteps, bundle_weight: float) -> float:
    """The retrieval score's weight in a scenario's fusion: the policy's, else the bundle's choice."""
    w = steps.fusion.retrieval_weight
    return bundle_weight if w is None else w


def with_affinity(fused: np.ndarray, affinity: np.ndarray | None, weight: float) -> np.ndarray:
    """The fused score plus ``weight`` x the standardised retrieval score, in units of the fused score's
    spread over the candidates (so the term means the same whatever the fusion weights' scale; the exposure
    boost is in the same units)."""
    if weight <= 0 or affinity is None or len(fused) < 2:
        return fused
    a = affinity.astype(np.float64)
    sd = float(a.std())
    if not np.isfinite(sd) or sd == 0:
        return fused
    spread = float(np.std(fused)) or 1.0
    return (fused + weight * spread * (a - a.mean()) / sd).astype(fused.dtype)


def _exposure_boost(steps: PolicySteps, fused: np.ndarray, creator: np.ndarray,
                    exposure: ExposureTracker | None) -> tuple[np.ndarray, np.ndarray]:
    """(score, boosted): the fused score plus the exposure step's boost of under-exposed creators (minus its
    demotion of over-exposed ones), in units of the candidates' score spread; boosted = the boost is > 0."""
    score = fused.astype(np.float64)
    boosted = np.zeros(len(fused), dtype=bool)
    if exposure is not None and steps.exposure.enabled and steps.exposure.strength > 0 and len(fused) > 1:
        spread = float(fused.std()) or 1.0
        adjust = exposure.under_exposure(creator)
        if steps.exposure.demote > 0:
            adjust = adjust - steps.exposure.demote * exposure.over_exposure(creator)
        bonus = exposure.boost * steps.exposure.strength * spread * adjust
        score = score + bonus
        boosted = bonus > 0
    return score, boosted


def _spread(head: list[int], body: list[int], explore: list[int]) -> list[int]:
    """Fan slots first, then the body with the exploration items spread evenly through it."""
    final = list(head)
    total = len(body) + len(explore)
    slots = {round((j + 1) * total / (len(explore) + 1)) for j in range(len(explore))}
    rest_body, rest_explore = list(body), list(explore)
    for p in range(total):
        if rest_explore and (p in slots or not rest_body):
            final.append(rest_explore.pop(0))
        else:
            final.append(rest_body.pop(0))
    return final


class _PageBuild:
    """One page under construction: which candidates are taken, per-creator counts under the diversity cap,
    and the reason each taken item was placed."""

    def __init__(self, creator: np.ndarray, category: np.ndarray, cap: int):
        self.cre = creator.tolist()
        self.cat = category.tolist()
        self.cap = cap
        self.taken: set[int] = set()
        self.per_creator: dict[int, int] = {}
        self.reasons: dict[int, str] = {}

    def can_take(self, i: int) -> bool:
        return i not in self.taken and self.per_creator.get(self.cre[i], 0) < self.cap

    def take(self, i: int, why: str) -> None:
        self.taken.add(i)
        self.per_creator[self.cre[i]] = self.per_creator.get(self.cre[i], 0) + 1
        self.reasons[i] = why

    def release(self, i: int) -> None:
        self.taken.discard(i)
        self.per_creator[self.cre[i]] -= 1
        self.reasons.pop(i, None)

    def fans_first(self, order: np.ndarray, fan_fresh: np.ndarray, steps: PolicySteps, k: int) -> list[int]:
        """Step 3: the best fresh items of iron-fan creators, at the top."""
        head: list[int] = []
        if steps.fans_first.enabled and steps.fans_first.slots > 0:
            for i in order[fan_fresh[order]].tolist():
                if len(head) >= min(steps.fans_first.slots, k):
                    break
                if self.can_take(i):
                    self.take(i, "fan")
                    head.append(i)
        return head

    def exploration(self, order: np.ndarray, new_category: np.ndarray, steps: PolicySteps, room: int) -> list[int]:
        """Step 7: the best items of categories new to the user, one per category."""
        explore: list[int] = []
        n_explore = min(steps.exploration.slots, room) if steps.exploration.enabled else 0
        seen_cats: set[int] = set()
        for i in order[new_category[order]].tolist() if n_explore > 0 else []:
            if len(explore) >= n_explore:
                break
            if self.cat[i] not in seen_cats and self.can_take(i):
                self.take(i, "exploration")
                explore.append(i)
                seen_cats.add(self.cat[i])
        return explore

    def diversity_fill(self, order: np.ndarray, fused: np.ndarray, boosted: np.ndarray, steps: PolicySteps,
                       n_fill: int, head: list[int]) -> list[int]:
        """Step 6: greedy in score order under the creator cap; an item whose category is among the last
        `window` placed is deferred (per-category queues, heads in a heap keyed by score rank) and placed as
        soon as its category is allowed again, before any lower-ranked item. With the exposure step's
        ``placement: relevance`` the chosen items are laid out again by fused score."""
        window = steps.diversity.category_window if steps.diversity.enabled else 0
        lead = [self.cat[i] for i in head][-window:] if window else []
        body = FeedPolicy._fill(order.tolist(), self.cat, n_fill, window, self.can_take, self.take, list(lead))
        if steps.exposure.placement == "relevance" and boosted.any() and len(body) > 1:
            chosen = set(body)
            by_fused = sorted(body, key=lambda i: (-fused[i], i))  # the page's k items only, ties by position
            body = FeedPolicy._fill(by_fused, self.cat, len(body), window, lambda i: i in chosen,
                                    lambda i, why: chosen.discard(i), list(lead))
        return body

    def quality_support(self, order: np.ndarray, hq: np.ndarray, steps: PolicySteps, k: int, reserved: list[int],
                        body: list[int]) -> None:
        """Step 4: swap the lowest body items (in place) for the best unused high-quality ones until the page
        holds ``min_share`` of high-quality creators' items, under the creator cap."""
        if not (steps.quality.enabled and steps.quality.min_share > 0 and k > 0):
            return
        need = math.ceil(steps.quality.min_share * k - 1e-9)
        have = int(hq[reserved + body].sum())
        if have >= need:
            return
        pos = len(body) - 1
        for cand in order[hq[order]].tolist():
            if have >= need:
                break
            if cand in self.taken:
                continue
            while pos >= 0 and hq[body[pos]]:
                pos -= 1
            if pos < 0:
                break
            old = body[pos]
            self.release(old)
            if self.can_take(cand):
                self.take(cand, "quality_support")
                body[pos] = cand
                have += 1
                pos -= 1
            else:  # creator cap: put the old item back and try the next candidate
                self.take(old, "relevance")

    def tags(self, idx: np.ndarray, fused: np.ndarray, boosted: np.ndarray, pool: np.ndarray | None) -> list[list[str]]:
        """Each placed item's reason, plus "exposure_boost" where the boost lifted it into the page past a
        better-fused item or the exposure candidate step brought it."""
        lifted = np.zeros(len(fused), dtype=bool)
        if boosted.any() and len(idx):
            fused_rank = np.empty(len(fused), dtype=np.int64)
            fused_rank[np.argsort(-fused, kind="stable")] = np.arange(len(fused))
            lifted = boosted & (fused_rank >= len(idx))
        out = []
        for i in idx.tolist():
            t = [self.reasons[i]]
            if lifted[i] or (pool is not None and pool[i]):
                t.append("exposure_boost")
            out.append(t)
        return out
