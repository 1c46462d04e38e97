"""Creator exposure: the service-wide decaying exposure counts, the Gini of creator exposure and the
controller that steers the exposure boost (:class:`ExposureTracker`), shared by every scenario."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from serving.policy_config import ExposureControl


def gini(x: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0 = equal, -> 1 = concentrated on one)."""
    v = np.sort(np.asarray(x, dtype=np.float64))
    n, total = len(v), float(v.sum())
    if n == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(2.0 * (ranks * v).sum() / (n * total) - (n + 1) / n)


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


# --------------------------------------------------------------------------- the exposure candidate step


def creator_groups(servable: np.ndarray, item_creator: np.ndarray, n_creators: int) -> tuple[np.ndarray, np.ndarray]:
    """Servable catalogue rows sorted by creator, and CSR pointers: creator c's rows are rows[ptr[c]:ptr[c+1]]."""
    rows = np.flatnonzero(servable)
    rows = rows[np.argsort(item_creator[rows], kind="stable")]
    return rows, np.searchsorted(item_creator[rows], np.arange(n_creators + 1))


def least_exposed_pool(tracker: ExposureTracker, groups: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Up to ``pool_size`` servable rows (``pool_per_creator`` per creator) of the creators below the mean
    exposure of eligible creators, least exposed first."""
    rows, ptr = groups
    size, per_creator = tracker.control.pool_size, tracker.control.pool_per_creator
    counts = np.minimum(np.diff(ptr), per_creator)
    cre = np.flatnonzero(counts > 0)
    e = tracker.exposure()[cre]
    mean = tracker.mean_exposure()
    if mean > 0:
        cre, e = cre[e < mean], e[e < mean]
    cre = cre[np.lexsort((cre, e))]
    cre = cre[: int(np.searchsorted(np.cumsum(counts[cre]), size)) + 1]
    # Each chosen creator's first counts[c] rows, gathered at once (a loop over creators took ~2 ms on the
    # request that rebuilds the pool, a p99 spike).
    take = counts[cre]
    first = np.repeat(ptr[cre] - np.cumsum(take) + take, take)
    out = rows[first + np.arange(len(first))]
    return out[:size]


def pool_candidates(pool_rows: np.ndarray, pool_vecs: np.ndarray, vec: np.ndarray, exclude: np.ndarray,
                    item_creator: np.ndarray, servable: np.ndarray, slots: int) -> np.ndarray:
    """Up to ``slots`` pool rows not in ``exclude``, one per creator, best for the user vector ``vec``."""
    if not len(pool_rows):
        return np.zeros(0, np.int64)
    score = pool_vecs @ vec.reshape(-1)
    score[np.isin(pool_rows, exclude)] = -np.inf  # already a candidate
    top = min(int(np.isfinite(score).sum()), 4 * slots)
    if top <= 0:
        return np.zeros(0, np.int64)
    best = np.argpartition(-score, top - 1)[:top] if top < len(score) else np.arange(len(score))
    cand = pool_rows[best[np.argsort(-score[best], kind="stable")]]
    _, first = np.unique(item_creator[cand], return_index=True)
    cand = cand[np.sort(first)][:slots]
    return cand[servable[cand]].astype(np.int64)
