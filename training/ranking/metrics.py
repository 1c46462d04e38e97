"""Ranking metrics, one implementation for fit-time and later-log evaluation.

- AUC and log loss: scikit-learn's (AUC is NaN when a class is missing; predictions clipped to [1e-7, 1 - 1e-7]).
- GAUC: per-user AUC over users with both classes, weighted by the user's impressions.
- ECE: sum over probability bins of (bin share) * |observed rate - mean prediction|.
- XAUC: share of pairs with different true watch time that the prediction orders the same way
  (prediction ties count one half), over all such pairs.
- NDCG@K per user over the user's impressions, gains given by the caller (see :func:`ndcg_at_k`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score

from features.metrics import ndcg, percentile_interval

EPS = 1e-7


def auc(y: np.ndarray, p: np.ndarray) -> float:
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(p, dtype=np.float64)))


def gauc(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """(impression-weighted mean of per-group AUC over groups with both classes, number of such groups)."""
    df = pd.DataFrame({"g": np.asarray(groups), "y": np.asarray(y).astype(np.int64), "p": np.asarray(p, np.float64)})
    df["r"] = df.groupby("g", sort=False)["p"].rank(method="average")
    agg = df.groupby("g", sort=False).agg(n=("y", "size"), pos=("y", "sum"))
    agg["rank_pos"] = df[df["y"] == 1].groupby("g", sort=False)["r"].sum()
    agg = agg[(agg["pos"] > 0) & (agg["pos"] < agg["n"])]
    if agg.empty:
        return float("nan"), 0
    neg = agg["n"] - agg["pos"]
    per = (agg["rank_pos"] - agg["pos"] * (agg["pos"] + 1) / 2) / (agg["pos"] * neg)
    return float(np.average(per.to_numpy(), weights=agg["n"].to_numpy())), len(agg)


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return float(log_loss(np.asarray(y, np.float64), p, labels=[0.0, 1.0]))


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int, strategy: str = "uniform") -> pd.DataFrame:
    """Per non-empty bin: count, mean prediction, observed rate. ``uniform``: equal-width bins on [0, 1];
    ``quantile``: equal-mass bins (readable for rare heads whose predictions crowd near 0)."""
    p = np.asarray(p, np.float64)
    if strategy == "uniform":
        idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    elif strategy == "quantile":
        edges = np.quantile(p, np.linspace(0, 1, bins + 1)[1:-1])
        idx = np.searchsorted(edges, p, side="right")
    else:
        raise ValueError(f"unknown calibration bin strategy '{strategy}'; use 'uniform' or 'quantile'")
    df = pd.DataFrame({"b": idx, "y": np.asarray(y, np.float64), "p": p})
    return df.groupby("b").agg(n=("y", "size"), pred=("p", "mean"), rate=("y", "mean")).reset_index()


def ece(y: np.ndarray, p: np.ndarray, bins: int = 15, strategy: str = "uniform") -> float:
    t = calibration_bins(y, p, bins, strategy)
    return float(np.sum(t["n"] / t["n"].sum() * np.abs(t["rate"] - t["pred"])))


def xauc(y: np.ndarray, p: np.ndarray) -> float:
    """Exact over all pairs in O(n log n): walk groups of equal y in increasing order and count, with a
    Fenwick tree over prediction ranks, earlier (smaller-y) items predicted lower (1) or equal (1/2)."""
    y = np.asarray(y, np.float64)
    p = np.asarray(p, np.float64)
    n = len(y)
    if n < 2:
        return float("nan")
    p_rank = np.unique(p, return_inverse=True)[1] + 1  # 1-based dense ranks
    m = int(p_rank.max())
    tree = np.zeros(m + 1, np.int64)

    def prefix(i: int) -> int:
        s = 0
        while i > 0:
            s += tree[i]
            i -= i & -i
        return s

    def add(i: int) -> None:
        while i <= m:
            tree[i] += 1
            i += i & -i

    order = np.argsort(y, kind="stable")
    ys, rs = y[order], p_rank[order]
    starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
    ends = np.r_[starts[1:], n]
    good = 0.0
    pairs = 0
    seen = 0
    for a, b in zip(starts, ends):
        group = rs[a:b]
        if seen:
            for r in group:
                lower = prefix(int(r) - 1)
                equal = prefix(int(r)) - lower
                good += lower + 0.5 * equal
            pairs += seen * (b - a)
        for r in group:
            add(int(r))
        seen += b - a
    return float(good / pairs) if pairs else float("nan")


def ndcg_at_k(scores: np.ndarray, gains: np.ndarray, groups: np.ndarray, k: int, min_items: int = 2) -> tuple[float, int]:
    """Mean NDCG@k over groups (users) with >= min_items rows and a positive ideal DCG.

    Rows of a group are ordered by score (descending; ties keep row order); DCG = sum gain / log2(pos + 2)
    over the top k; the ideal orders the same rows by gain. Gains must be >= 0."""
    gains = np.asarray(gains, np.float64)
    if (gains < 0).any():
        raise ValueError("ndcg_at_k needs non-negative gains; clip them first")
    df = pd.DataFrame({"g": np.asarray(groups), "s": np.asarray(scores, np.float64), "gain": gains})
    df["row"] = np.arange(len(df))
    n = df.groupby("g", sort=False)["s"].transform("size")
    df = df[n >= min_items]
    if df.empty:
        return float("nan"), 0

    def top_k(by: str) -> np.ndarray:
        """(groups, k) gains of each group's first k rows ordered by ``by``, zero-padded."""
        f = df.sort_values(["g", by, "row"], ascending=[True, False, True], kind="stable")
        pos = f.groupby("g", sort=False).cumcount().to_numpy()
        group = pd.factorize(f["g"], sort=True)[0]
        keep = pos < k
        out = np.zeros((group.max() + 1, k))
        out[group[keep], pos[keep]] = f["gain"].to_numpy()[keep]
        return out

    vals = ndcg(top_k("s"), top_k("gain"), k)
    ok = ~np.isnan(vals)
    return (float(vals[ok].mean()) if ok.any() else float("nan")), int(ok.sum())


def head_report(y: np.ndarray, p: np.ndarray, users: np.ndarray, ece_bins: int) -> dict[str, float | int]:
    g, n_users = gauc(y, p, users)
    return {
        "auc": auc(y, p),
        "gauc": g,
        "logloss": logloss(y, p),
        "ece": ece(y, p, ece_bins, "uniform"),
        "ece_quantile": ece(y, p, ece_bins, "quantile"),
        "positives": int(np.asarray(y).sum()),
        "impressions": int(len(y)),
        "gauc_users": n_users,
    }


def watch_report(true_ms: np.ndarray, pred_ms: np.ndarray) -> dict[str, float]:
    true_ms = np.asarray(true_ms, np.float64)
    pred_ms = np.asarray(pred_ms, np.float64)
    ok = np.isfinite(true_ms) & np.isfinite(pred_ms)
    return {"xauc": xauc(true_ms[ok], pred_ms[ok]), "mae_ms": float(np.mean(np.abs(true_ms[ok] - pred_ms[ok])))}


def weighted_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    """AUC with row weights (ties count one half): sum over score groups of w_pos * (w_neg below + w_neg
    tied / 2), over W_pos * W_neg. Unit weights give :func:`auc`."""
    return grouped_auc(np.asarray(y).astype(bool), score_groups(p), w)


def score_groups(p: np.ndarray) -> np.ndarray:
    """Rank of each row's distinct score (ties share one), what :func:`grouped_auc` sums over."""
    return np.unique(np.asarray(p, np.float64), return_inverse=True)[1]


def grouped_auc(y: np.ndarray, group: np.ndarray, w: np.ndarray) -> float:
    w = np.asarray(w, np.float64)
    wp = np.bincount(group, weights=w * y)
    wn = np.bincount(group, weights=w * ~y)
    total_p, total_n = wp.sum(), wn.sum()
    if total_p <= 0 or total_n <= 0:
        return float("nan")
    below = np.cumsum(wn) - wn
    return float((wp * (below + 0.5 * wn)).sum() / (total_p * total_n))


def user_resamples(users: np.ndarray, samples: int, seed: int):
    """Row weights of ``samples`` user-bootstrap resamples: users drawn with replacement, each bringing all
    its impressions (impressions of one user are not independent)."""
    code, uniq = pd.factorize(pd.Series(np.asarray(users)))
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        yield np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq)).astype(np.float64)[code]


def bootstrap_auc_interval(y: np.ndarray, p: np.ndarray, users: np.ndarray, samples: int, seed: int,
                           level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUC over user-bootstrap resamples."""
    y, group = np.asarray(y).astype(bool), score_groups(p)
    vals = [a for w in user_resamples(users, samples, seed) if np.isfinite(a := grouped_auc(y, group, w))]
    return percentile_interval(vals, level)


def bootstrap_auc_difference(y: np.ndarray, p: np.ndarray, q: np.ndarray, users: np.ndarray, samples: int, seed: int,
                             level: float = 0.95) -> tuple[float, float, float]:
    """AUC(p) - AUC(q) on the same impressions, and its paired user-bootstrap percentile interval (both
    scored on each resample, so the shared noise of the impressions cancels)."""
    y, gp, gq = np.asarray(y).astype(bool), score_groups(p), score_groups(q)
    ones = np.ones(len(y))
    diff = grouped_auc(y, gp, ones) - grouped_auc(y, gq, ones)
    vals = [d for w in user_resamples(users, samples, seed)
            if np.isfinite(d := grouped_auc(y, gp, w) - grouped_auc(y, gq, w))]
    return (float(diff), *percentile_interval(vals, level))
