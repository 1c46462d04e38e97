"""List metrics shared by training's offline evaluation and serving's offline policy evaluation, and the
percentile interval of the bootstrap resamples both training stages report.

One NDCG for the whole stack: DCG = sum of gain / log2(position + 2) over the first k positions
(position 0-based), divided by the DCG of the same list's gains in their best order.
"""

from __future__ import annotations

import numpy as np


def position_discount(k: int) -> np.ndarray:
    """(k,) the NDCG discount 1 / log2(position + 2) of positions 0..k-1."""
    return 1.0 / np.log2(np.arange(k) + 2.0)


def ndcg(ordered_gains: np.ndarray, ideal_gains: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k per list.

    ordered_gains: (n, m) each list's gains in served order (m may be below or above k);
    ideal_gains: (n, m') the gains the list could have had, in any order (sorted here, best first).
    Returns (n,) NDCG@k, NaN where the ideal DCG is 0 (no positive gain to find).
    """
    ordered = np.asarray(ordered_gains, np.float64)[:, :k]
    ideal = -np.sort(-np.asarray(ideal_gains, np.float64), axis=1)[:, :k]
    dcg = ordered @ position_discount(ordered.shape[1])
    idcg = ideal @ position_discount(ideal.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), np.nan)


def percentile_interval(vals, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap values (NaN, NaN without any)."""
    if len(vals) == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha))


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int, samples: int = 1000,
                      level: float = 0.95) -> dict[str, float | list[float]]:
    """mean(a - b) over users and its user-bootstrap percentile interval (a and b: per-user values)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(samples)])
    return {"difference": float(d.mean()), "ci95": list(percentile_interval(means, level))}
