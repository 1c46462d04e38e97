"""Duration-debiased watch-time target in the manner of D2Q (Kuaishou, KDD 2022).

Raw watch time grows with video length, so a regressor on it mostly learns "long video = long watch" and
a ranker fed with it pushes long videos. Instead: cut durations into equal-frequency buckets (train
data), and within a bucket replace watch time by its quantile in that bucket's watch-time distribution.
The target is in [0, 1] and comparable across lengths; a prediction q is decoded back to milliseconds
through the bucket's quantile grid (piecewise linear), so MAE in ms and XAUC stay measurable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class WatchTimeQuantiles:
    edges: np.ndarray  # (n_buckets - 1,) duration boundaries in ms; bucket = #edges < duration
    grid: np.ndarray  # (n_buckets, n_levels) watch time (ms) at levels linspace(0, 1, n_levels), increasing

    @classmethod
    def fit(cls, duration_ms: np.ndarray, watch_ms: np.ndarray, n_buckets: int, n_levels: int) -> "WatchTimeQuantiles":
        d = np.asarray(duration_ms, np.float64)
        w = np.asarray(watch_ms, np.float64)
        ok = np.isfinite(d) & np.isfinite(w)
        d, w = d[ok], w[ok]
        if len(d) < n_buckets:
            raise ValueError(f"watch-time buckets: {len(d)} rows with duration and watch time, fewer than "
                             f"ranking.watch_time_buckets = {n_buckets}")
        edges = np.unique(np.quantile(d, np.linspace(0, 1, n_buckets + 1)[1:-1]))
        bucket = np.searchsorted(edges, d, side="left")
        levels = np.linspace(0, 1, n_levels)
        grid = np.zeros((len(edges) + 1, n_levels))
        for b in range(len(edges) + 1):
            vals = w[bucket == b]
            grid[b] = np.quantile(vals, levels) if len(vals) else np.quantile(w, levels)
        # Strictly increasing rows, so decode(encode(w)) = w and mass points (many zero watches) spread out.
        span = max(float(w.max() - w.min()), 1.0)
        grid = np.maximum.accumulate(grid + np.arange(n_levels) * span * 1e-9, axis=1)
        return cls(edges.astype(np.float64), grid)

    @property
    def levels(self) -> np.ndarray:
        return np.linspace(0, 1, self.grid.shape[1])

    def bucket(self, duration_ms: np.ndarray) -> np.ndarray:
        d = np.nan_to_num(np.asarray(duration_ms, np.float64), nan=0.0)
        return np.searchsorted(self.edges, d, side="left")

    def encode(self, duration_ms: np.ndarray, watch_ms: np.ndarray) -> np.ndarray:
        """Quantile of each watch time within its duration bucket, in [0, 1]; NaN stays NaN."""
        b = self.bucket(duration_ms)
        w = np.asarray(watch_ms, np.float64)
        out = np.full(len(w), np.nan)
        for k in np.unique(b):
            m = (b == k) & np.isfinite(w)
            out[m] = np.interp(w[m], self.grid[k], self.levels)
        return out

    def decode(self, duration_ms: np.ndarray, q: np.ndarray) -> np.ndarray:
        b = self.bucket(duration_ms)
        q = np.clip(np.asarray(q, np.float64), 0, 1)
        out = np.empty(len(q))
        for k in np.unique(b):
            m = b == k
            out[m] = np.interp(q[m], self.levels, self.grid[k])
        return out

    def to_json(self) -> dict[str, Any]:
        return {"duration_edges_ms": self.edges.tolist(), "levels": self.grid.shape[1],
                "grid_ms": np.round(self.grid, 3).tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "WatchTimeQuantiles":
        return cls(np.asarray(d["duration_edges_ms"], np.float64), np.asarray(d["grid_ms"], np.float64))


class WatchTimeDecoder(nn.Module):
    """(duration_ms (B,), quantile (B,)) -> watch time ms (B,), the torch twin of ``decode`` for export."""

    def __init__(self, wtq: WatchTimeQuantiles):
        super().__init__()
        self.register_buffer("edges", torch.tensor(wtq.edges, dtype=torch.float32))
        self.register_buffer("grid", torch.tensor(wtq.grid, dtype=torch.float32))

    def forward(self, duration_ms: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        d = torch.nan_to_num(duration_ms, nan=0.0)
        bucket = (d.unsqueeze(1) > self.edges.unsqueeze(0)).sum(dim=1)  # (B,)
        rows = self.grid[bucket]  # (B, Q)
        n = self.grid.shape[1]
        pos = q.clamp(0, 1) * (n - 1)
        lo = pos.floor().clamp(0, n - 2)
        frac = (pos - lo).unsqueeze(1)
        lo_i = lo.long().unsqueeze(1)
        a = rows.gather(1, lo_i)
        b = rows.gather(1, lo_i + 1)
        return (a + (b - a) * frac).squeeze(1)
