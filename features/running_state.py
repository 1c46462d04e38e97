"""State carried across snapshot blocks by the out-of-core build (features/engine_duckdb.py).

The in-memory build keeps every aggregate for every (entity, block) and gathers rows from it. Here the
rows arrive block by block in time order, so each aggregate is one running total per entity: rows of
block b read the totals (everything of blocks < b), then block b's rows are added. Memory grows with the
entities, not with the rows or the blocks. Sums are taken in the same order as the in-memory path
(per block in row order, then block after block), so the values are the same, not merely close.

Entities are integer codes assigned by the engine (0..n-1, in the sort order of their ids).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.config import FansConfig
from features.quality import Snapshots, capped_ratio, quality_columns, smoothed_rate

DAY_MS = 86_400_000


def _ordered_sum(x: np.ndarray) -> float:
    """Sum in index order (as the in-memory path's column sums over entities), not numpy's pairwise sum."""
    return float(np.cumsum(x)[-1]) if len(x) else 0.0


class RunningCounts:
    """Per entity: impressions ``n``, positives of each signal and, with ``ratio``, the sum and count of
    capped watch ratios; totals of the blocks added so far."""

    def __init__(self, n_keys: int, signals: list[str], ratio: bool, dtype: type = np.float64):
        self.n_keys, self.signals, self.ratio = n_keys, list(signals), ratio
        names = ["n", *signals] + (["wr_sum", "wr_n"] if ratio else [])
        self.sums = {name: np.zeros(n_keys, dtype) for name in names}

    def add(self, codes: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """Add one block's rows (``rows[signal]``, ``rows["watch_ratio"]``), in row order."""
        def count(w: np.ndarray | None) -> np.ndarray:
            return np.bincount(codes, weights=w, minlength=self.n_keys)

        delta = {"n": count(None)} | {s: count(rows[s].astype(np.float64)) for s in self.signals}
        if self.ratio:
            r = rows["watch_ratio"].astype(np.float64)
            delta |= {"wr_sum": count(capped_ratio(r)), "wr_n": count((~np.isnan(r)).astype(np.float64))}
        for name, d in delta.items():
            self.sums[name] += d.astype(self.sums[name].dtype)

    def raw(self, prefix: str, codes: np.ndarray) -> dict[str, np.ndarray]:
        """``<prefix>_n`` and ``<prefix>_<signal>``: raw counts of ``codes`` as float32 (prior 0)."""
        out = {f"{prefix}_n": self.sums["n"][codes].astype(np.float32)}
        return out | {f"{prefix}_{s}": self.sums[s][codes].astype(np.float32) for s in self.signals}


class RunningQuality(RunningCounts):
    """The smoothed rates of features/quality.py (``snapshot_quality``) from running totals."""

    def __init__(self, n_keys: int, prefix: str, signals: list[str], ratio: bool, k: float,
                 score_weights: dict[str, float] | None):
        super().__init__(n_keys, signals, ratio)
        self.prefix, self.k, self.score_weights = prefix, k, score_weights

    def priors(self) -> dict[str, float]:
        """Global rates of everything added so far: the rate of an entity never seen."""
        n = _ordered_sum(self.sums["n"])
        g = {s: _ordered_sum(self.sums[s]) / n if n > 0 else 0.0 for s in self.signals}
        if self.ratio:
            wn = _ordered_sum(self.sums["wr_n"])
            g["watch_ratio"] = _ordered_sum(self.sums["wr_sum"]) / wn if wn > 0 else 0.0
        return g

    def columns(self, codes: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.float32]]:
        """Feature columns (float32) of entities ``codes`` as of now, and the values of an unseen entity."""
        g = self.priors()
        n = self.sums["n"][codes]
        rates = {s: smoothed_rate(self.sums[s][codes], n, g[s], self.k) for s in self.signals}
        if self.ratio:
            rates["watch_ratio"] = smoothed_rate(self.sums["wr_sum"][codes], self.sums["wr_n"][codes],
                                                 g["watch_ratio"], self.k)
        values, prior = quality_columns(self.prefix, n, rates, {s: np.float64(v) for s, v in g.items()},
                                        self.score_weights)
        return ({name: v.astype(np.float32) for name, v in values.items()},
                {name: np.float32(v) for name, v in prior.items()})

    def snapshot(self, keys: pd.Index) -> Snapshots:
        """A one-block :class:`Snapshots` of every entity now (block 0), for the serving tables."""
        values, prior = self.columns(np.arange(self.n_keys))
        return Snapshots(keys, {k: v[:, None] for k, v in values.items()},
                         {k: np.array([v], np.float32) for k, v in prior.items()})


def user_activity(user_n: np.ndarray, block_starts: list[int], block: int) -> np.ndarray:
    """Impressions per day of data before ``block`` (features/behaviour.py: snapshot_user)."""
    days = max((block_starts[block] - block_starts[0]) / DAY_MS, 1.0)
    return (np.expm1(user_n.astype(np.float64)) / days).astype(np.float32)


class RunningFans:
    """Per (user, creator) pair: followed before now, and the interaction events of the iron-fan window."""

    def __init__(self, n_pairs: int, cfg: FansConfig):
        self.cfg = cfg
        self.window_ms = int(cfg.iron_fan_window_days * DAY_MS)
        self.follow = np.zeros(n_pairs, bool)
        self.first_event = np.full(n_pairs, -1, np.int64)  # position of the pair's first event in the log
        self.events: list[tuple[np.ndarray, np.ndarray]] = []  # (pair codes, ts) of interactions, by block
        self._window: tuple[int | None, np.ndarray] = (None, np.zeros(0, np.int32))  # (cutoff, counts per pair)

    def flags(self, rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(interaction, follow) per row, as features/fans.py: _events."""
        n = len(rows["ts"])
        inter = np.zeros(n, bool)
        for s in self.cfg.interaction_signals:
            inter |= rows[s] > 0
        follow = rows[self.cfg.follow_signal] > 0 if self.cfg.follow_signal else np.zeros(n, bool)
        return inter, follow

    def relations(self, codes: np.ndarray, cutoff: int) -> dict[str, np.ndarray]:
        """is_fan, is_iron_fan, fan_interactions of pairs ``codes`` as of ``cutoff`` (>= every added ts)."""
        if self._window[0] != cutoff:  # every chunk of a block asks with the same cutoff: count once
            lo = cutoff - self.window_ms
            recent = [c[t >= lo] for c, t in self.events]
            recent_codes = np.concatenate(recent) if recent else np.zeros(0, np.int64)
            self._window = (cutoff, np.bincount(recent_codes, minlength=len(self.follow)).astype(np.int32))
        inter = self._window[1][codes]
        is_fan = self.follow[codes]
        return {"is_fan": is_fan.astype(np.int8),
                "is_iron_fan": (is_fan & (inter >= self.cfg.iron_fan_min_interactions)).astype(np.int8),
                "fan_interactions": inter.astype(np.int32)}

    def add(self, codes: np.ndarray, rows: dict[str, np.ndarray], first_pos: int, next_cutoff: int) -> None:
        """Add one block's rows (row ``i`` is the log's row ``first_pos + i``); forget events that no later
        cutoff (>= ``next_cutoff``) can count."""
        inter, follow = self.flags(rows)
        self.follow[codes[follow]] = True
        ev = np.flatnonzero(inter | follow)
        uniq, first = np.unique(codes[ev], return_index=True)
        new = self.first_event[uniq] < 0
        self.first_event[uniq[new]] = first_pos + ev[first[new]]
        self.events.append((codes[inter], rows["ts"][inter]))
        self._window = (None, np.zeros(0, np.int32))
        lo = next_cutoff - self.window_ms
        self.events = [(c[t >= lo], t[t >= lo]) for c, t in self.events]


class RunningHistory:
    """Each user's last ``length`` positive items (item indices), most recent last, left-padded with 0."""

    def __init__(self, n_users: int, length: int):
        self.items = np.zeros((n_users, length), np.int64)

    def add(self, users: np.ndarray, items: np.ndarray) -> None:
        """Append positives (row order = time order) to their users' histories."""
        if not len(users):
            return
        order = np.argsort(users, kind="stable")  # by user, time order kept within a user
        users, items = users[order], items[order]
        touched, start, per_user = np.unique(users, return_index=True, return_counts=True)
        length = self.items.shape[1]
        m = per_user[:, None]
        src = np.arange(length)[None, :] + m  # old slot j moves to j - m
        keep = src < length
        shifted = np.zeros((len(touched), length), np.int64)
        rows_kept, cols_kept = np.nonzero(keep)
        shifted[rows_kept, cols_kept] = self.items[touched[rows_kept], src[keep]]
        t = np.repeat(np.arange(len(touched)), per_user)
        rank = np.arange(len(users)) - start[t]
        pos = length - (per_user[t] - rank)
        ok = pos >= 0
        shifted[t[ok], pos[ok]] = items[ok]
        self.items[touched] = shifted
