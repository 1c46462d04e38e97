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

Items placed on score alone carry "relevance". Creator exposure lives in :class:`ExposureTracker`
(exponentially decaying counts, one per creator), owned by the caller so that one tracker can follow a
whole service or a whole offline run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from features.config import ConfigError, from_dict, to_dict

REASONS = ("relevance", "fan", "quality_support", "exposure_boost", "exploration")


# --------------------------------------------------------------------------- config (the `policy:` section)


@dataclass
class FusionStep:
    mode: Literal["sum", "product"] = "sum"  # product: prod(p_h ** w_h), hate's negative weight divides
    # Per-head weight overrides of the bundle's scenario weights (head -> weight); empty = the bundle's.
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class FansFirstStep:
    enabled: bool = True
    slots: int = 2  # priority slots at the top of the page
    fresh_days: float | None = 30.0  # item uploaded within this many days of the reference time; null = any age


@dataclass
class QualityStep:
    enabled: bool = True
    min_share: float = 0.25  # of the page, from creators flagged high-quality in the bundle


@dataclass
class ExposureStep:
    enabled: bool = True
    strength: float = 1.0  # scales the controller's boost for this scenario (0 = no boost)
    # Extra candidates per request, beyond the retrieval top-N: the items of currently under-exposed
    # creators (a pool refreshed every ``exposure_control.update_every`` pages) that score best against the
    # user vector. They are ranked and paged like any candidate; 0 disables.
    candidate_slots: int = 0
    # Where boosted items go: "score" = page order by boosted score; "relevance" = the boost only decides
    # which items make the page, which are then laid out by fused score (diversity rules still apply).
    placement: Literal["score", "relevance"] = "score"
    # Weight of the penalty on over-exposed creators (1 - mean / exposure above the mean), in the same
    # boost units as the bonus of under-exposed ones; 0 = boost only.
    demote: float = 0.0


@dataclass
class DiversityStep:
    enabled: bool = True
    max_per_creator: int = 2
    category_window: int = 2  # the same category is not placed twice within this many consecutive slots


@dataclass
class ExplorationStep:
    enabled: bool = True
    slots: int = 1  # items from categories new to the user, spread over the page


@dataclass
class PolicySteps:
    """Everything that may differ per scenario."""

    fusion: FusionStep = field(default_factory=FusionStep)
    fans_first: FansFirstStep = field(default_factory=FansFirstStep)
    quality: QualityStep = field(default_factory=QualityStep)
    exposure: ExposureStep = field(default_factory=ExposureStep)
    diversity: DiversityStep = field(default_factory=DiversityStep)
    exploration: ExplorationStep = field(default_factory=ExplorationStep)

    def validate(self, where: str) -> None:
        if self.fans_first.slots < 0 or self.exploration.slots < 0:
            raise ConfigError(f"{where}: fans_first.slots and exploration.slots must be >= 0")
        if self.fans_first.fresh_days is not None and self.fans_first.fresh_days < 0:
            raise ConfigError(f"{where}.fans_first.fresh_days must be >= 0, got {self.fans_first.fresh_days}")
        if not 0 <= self.quality.min_share <= 1:
            raise ConfigError(f"{where}.quality.min_share must be in [0, 1], got {self.quality.min_share}")
        if self.diversity.max_per_creator < 1:
            raise ConfigError(f"{where}.diversity.max_per_creator must be >= 1, got {self.diversity.max_per_creator}")
        if self.diversity.category_window < 0:
            raise ConfigError(f"{where}.diversity.category_window must be >= 0")
        if self.exposure.strength < 0:
            raise ConfigError(f"{where}.exposure.strength must be >= 0, got {self.exposure.strength}")
        if self.exposure.demote < 0:
            raise ConfigError(f"{where}.exposure.demote must be >= 0, got {self.exposure.demote}")
        if self.exposure.candidate_slots < 0:
            raise ConfigError(f"{where}.exposure.candidate_slots must be >= 0, got {self.exposure.candidate_slots}")


@dataclass
class GovernanceConfig:
    blocked_items: list[str] = field(default_factory=list)
    blocked_creators: list[str] = field(default_factory=list)


@dataclass
class ExposureControl:
    """The service-wide exposure tracker and its Gini controller (shared by all scenarios)."""

    half_life_pages: float = 2000.0  # a page's exposure counts half after this many later pages
    gini_target: float = 0.6
    update_every: int = 50  # pages between Gini recomputations / controller steps
    gain: float = 0.25  # multiplicative step of the boost strength per update
    initial_boost: float = 0.5
    max_boost: float = 8.0  # in units of the candidates' score spread (std)
    # The exposure candidate pool: servable items of creators below the mean exposure, least exposed first.
    pool_size: int = 2000
    pool_per_creator: int = 3


@dataclass
class PolicyConfig(PolicySteps):
    governance: GovernanceConfig = field(default_factory=GovernanceConfig)
    exposure_control: ExposureControl = field(default_factory=ExposureControl)
    # scenario -> partial overrides of the steps above, e.g. {commerce: {fans_first: {slots: 0}}}
    scenarios: dict[str, Any] = field(default_factory=dict)
    _resolved: dict[str, PolicySteps] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate("policy")
        c = self.exposure_control
        if (c.half_life_pages <= 0 or c.update_every < 1 or not 0 < c.gini_target <= 1 or c.gain <= 0
                or c.pool_size < 1 or c.pool_per_creator < 1):
            raise ConfigError("policy.exposure_control: half_life_pages > 0, update_every >= 1, "
                              "0 < gini_target <= 1, gain > 0, pool_size >= 1 and pool_per_creator >= 1 are required")
        base = {k: v for k, v in to_dict(self).items() if k in _STEP_KEYS}
        for name, override in self.scenarios.items():
            where = f"policy.scenarios.{name}"
            if not isinstance(override, dict):
                raise ConfigError(f"{where}: expected a mapping of step overrides, got {override!r}")
            merged = {k: dict(v) for k, v in base.items()}
            for step, values in override.items():
                if step not in _STEP_KEYS:
                    raise ConfigError(f"unknown config key '{where}.{step}'; known keys here: {sorted(_STEP_KEYS)}")
                if not isinstance(values, dict):
                    raise ConfigError(f"{where}.{step}: expected a mapping, got {values!r}")
                merged[step].update(values)
            steps = from_dict(PolicySteps, merged, where)
            steps.validate(where)
            self._resolved[name] = steps

    def for_scenario(self, scenario: str) -> PolicySteps:
        """The steps of ``scenario``: the defaults with that scenario's overrides applied."""
        return self._resolved.get(scenario, self)

    @classmethod
    def engagement_only(cls, base: "PolicyConfig | None" = None) -> "PolicyConfig":
        """Governance and fusion only: the baseline the other steps are compared against.

        With ``base``, its governance, fusion (scenario fusion overrides included) and exposure control are
        kept, so that the baseline differs from ``base`` only by the page steps it switches off.
        """
        if base is None:
            return cls(fans_first=FansFirstStep(enabled=False), quality=QualityStep(enabled=False),
                       exposure=ExposureStep(enabled=False), diversity=DiversityStep(enabled=False),
                       exploration=ExplorationStep(enabled=False))
        raw = {f.name: to_dict(getattr(base, f.name)) for f in dataclasses.fields(base) if f.init}
        for step in _STEP_KEYS - {"fusion"}:
            raw[step]["enabled"] = False
        raw["scenarios"] = {name: {k: v for k, v in o.items() if k == "fusion"} for name, o in base.scenarios.items()}
        return load_policy(raw)


_STEP_KEYS = frozenset({"fusion", "fans_first", "quality", "exposure", "diversity", "exploration"})


def load_policy(raw: dict[str, Any] | None) -> PolicyConfig:
    return from_dict(PolicyConfig, raw or {}, "policy")


# --------------------------------------------------------------------------- math helpers


def gini(x: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0 = equal, -> 1 = concentrated on one)."""
    v = np.sort(np.asarray(x, dtype=np.float64))
    n, total = len(v), float(v.sum())
    if n == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(2.0 * (ranks * v).sum() / (n * total) - (n + 1) / n)


def fuse(preds: np.ndarray, weights: np.ndarray, mode: str = "sum") -> np.ndarray:
    """preds (n, T) head predictions in [0, 1], weights (T,) -> (n,) fused score."""
    if mode == "sum":
        return preds @ weights
    return np.exp(np.log(np.clip(preds, 1e-6, 1.0)) @ weights)


# --------------------------------------------------------------------------- exposure


_HEADER = ("log_scale", "pages", "boost", "current_gini", "eligible_stored")


def _header_field(name: str, cast: type = float) -> property:
    """A tracker scalar kept in its state array (so a shared, memory-mapped tracker shares it too)."""
    i = _HEADER.index(name)
    return property(lambda self: cast(self._state[i]), lambda self, v: self._state.__setitem__(i, v))


class ExposureTracker:
    """Creator exposure over an exponentially decaying window of served pages, and the boost controller.

    Counts are stored scaled by ``2 ** (page / half_life)`` so that recording a page touches only its
    creators; the true decayed count is ``stored / scale``. Every ``update_every`` pages the Gini of
    exposure over all creators is recomputed and the boost strength moves up (Gini above target) or down.
    Thread-safe: the service records pages from several request threads. With ``store`` (a file path) the
    state lives in a memory-mapped file that several worker processes share, updates under a file lock,
    so the service's exposure, boost and Gini are one across its workers.
    """

    def __init__(self, n_creators: int, control: ExposureControl, eligible: np.ndarray | None = None,
                 store: str | os.PathLike | None = None):
        self.control = control
        self._lock = threading.Lock()
        self._file = None
        if store is None:
            state = np.zeros(len(_HEADER) + n_creators, dtype=np.float64)
            state[_HEADER.index("boost")] = control.initial_boost
        else:
            state = self._open_store(Path(store), n_creators, control)
        self._state = state  # header scalars, then the (C,) counts: one array, so one file can hold both
        self.counts = state[len(_HEADER):]
        self.store = None if store is None else Path(store)
        # Creators that can be served at all (visible items): the population the Gini is taken over.
        self.eligible = np.ones(n_creators, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)

    def _open_store(self, path: Path, n_creators: int, control: ExposureControl) -> np.ndarray:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        size = (len(_HEADER) + n_creators) * 8
        self._file = open(path.with_name(path.name + ".lock"), "a+b")
        fcntl.flock(self._file, fcntl.LOCK_EX)
        try:  # the first worker creates it; the others (and restarts) map what is there
            if not path.exists() or path.stat().st_size != size:
                init = np.zeros(len(_HEADER) + n_creators, dtype=np.float64)
                init[_HEADER.index("boost")] = control.initial_boost
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                init.tofile(tmp)
                tmp.replace(path)
            return np.memmap(path, dtype=np.float64, mode="r+", shape=(len(_HEADER) + n_creators,))
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if self._file is None:
                yield
                return
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._file, fcntl.LOCK_UN)

    _log_scale = _header_field("log_scale")  # log2 of the current scale
    pages = _header_field("pages", int)
    boost = _header_field("boost")
    current_gini = _header_field("current_gini")
    _eligible_stored = _header_field("eligible_stored")  # running sum of the stored counts of eligible creators

    @property
    def eligible(self) -> np.ndarray:
        return self._eligible

    @eligible.setter
    def eligible(self, mask: np.ndarray) -> None:
        # The running sum over eligible creators keeps the mean exposure O(1) per request.
        with self._locked():
            self._eligible = np.asarray(mask, dtype=bool)
            self._n_eligible = int(self._eligible.sum())
            self._eligible_stored = float(self.counts[self._eligible].sum())

    @property
    def n_creators(self) -> int:
        return len(self.counts)

    def exposure(self) -> np.ndarray:
        """(C,) decayed exposure counts."""
        return self.counts * 2.0 ** (-self._log_scale)

    def mean_exposure(self) -> float:
        n = self._n_eligible
        return self._eligible_stored * 2.0 ** (-self._log_scale) / n if n else 0.0

    def _ratio(self, creators: np.ndarray) -> np.ndarray | None:
        """(n,) decayed exposure / mean exposure of eligible creators; None before anything was shown."""
        mean = self.mean_exposure()
        if mean <= 0:
            return None
        return self.counts[creators] * 2.0 ** (-self._log_scale) / mean

    def under_exposure(self, creators: np.ndarray) -> np.ndarray:
        """(n,) in [0, 1]: 1 = never shown, 0 = at or above the mean exposure of eligible creators."""
        r = self._ratio(creators)
        return np.zeros(len(creators)) if r is None else np.clip(1.0 - r, 0.0, 1.0)

    def over_exposure(self, creators: np.ndarray) -> np.ndarray:
        """(n,) in [0, 1): 0 = at or below the mean exposure, -> 1 = far above it (1 - mean / exposure)."""
        r = self._ratio(creators)
        return np.zeros(len(creators)) if r is None else np.where(r > 1.0, 1.0 - 1.0 / np.maximum(r, 1.0), 0.0)

    def record(self, creators: np.ndarray) -> None:
        with self._locked():
            self.pages += 1
            self._log_scale += 1.0 / self.control.half_life_pages
            if self._log_scale > 500:  # renormalise long before float64 overflows
                self.counts *= 2.0 ** (-self._log_scale)
                self._eligible_stored *= 2.0 ** (-self._log_scale)
                self._log_scale = 0.0
            creators = np.asarray(creators, dtype=np.int64)
            w = 2.0 ** self._log_scale
            np.add.at(self.counts, creators, w)
            self._eligible_stored += w * float(self._eligible[creators].sum())
            if self.pages % self.control.update_every == 0:
                self._step()

    def _step(self) -> None:
        c = self.control
        self.current_gini = gini(self.exposure()[self.eligible])
        factor = 1.0 + c.gain
        if self.current_gini > c.gini_target:
            self.boost = min(c.max_boost, max(self.boost, 1e-3) * factor)
        else:
            self.boost = self.boost / factor

    def remap(self, old_ids: np.ndarray, new_ids: np.ndarray, eligible: np.ndarray) -> "ExposureTracker":
        """A tracker for a new creator id order (bundle reload) carrying the counts over by creator id."""
        import pandas as pd

        new = ExposureTracker(len(new_ids), self.control, eligible)
        pos = pd.Index(old_ids).get_indexer(pd.Index(new_ids))
        with self._locked():
            ok = pos >= 0
            new.counts[ok] = self.counts[pos[ok]]
            new._log_scale, new.pages, new.boost, new.current_gini = (
                self._log_scale, self.pages, self.boost, self.current_gini)
        new.eligible = eligible  # recompute the running sum over the carried counts
        return new


# --------------------------------------------------------------------------- the page


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
