"""Retrieval evaluation protocol, one implementation shared by fit-time evaluation and ``evaluate --log``.

Protocol (kept exactly so numbers compare across runs): full ranking over every item seen in training;
test users are users seen in training with at least one positive in the evaluated period on such an item;
each user's ranking excludes the items that user was shown in training; Recall@K = hits in top K / number
of the user's positives; NDCG@K with binary gains; both averaged over users.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.metrics import ndcg


@dataclass
class EvalSet:
    """The users and candidates of one evaluation, in candidate-position space.

    ``candidates`` are catalogue rows (items.parquet order); ``exclude`` and ``targets`` are (U, N) CSR
    matrices over candidate positions; ``first_row`` is, per user, the index (into the evaluated rows) of a
    row that carries the user's features for the period (history and attributes are constant per user
    within one evaluated period).
    """

    user_ids: np.ndarray  # (U,) raw ids, sorted
    first_row: np.ndarray  # (U,)
    candidates: np.ndarray  # (N,) catalogue rows
    exclude: sp.csr_matrix  # (U, N)
    targets: sp.csr_matrix  # (U, N)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


def _pair_matrix(u: np.ndarray, c: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    m = sp.csr_matrix((np.ones(len(u), dtype=np.int8), (u, c)), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1
    return m


def make_eval_set(
    seen: pd.DataFrame, rows: pd.DataFrame, catalogue_item_ids: pd.Index | np.ndarray, signal: str
) -> EvalSet:
    """``seen``: the training rows (user_id, item_id); ``rows``: the evaluated period (user_id, item_id, signal)."""
    catalogue = pd.Index(np.asarray(catalogue_item_ids).astype(str))
    seen_items = seen["item_id"].astype(str)
    candidates = np.flatnonzero(catalogue.isin(seen_items.unique()))
    cand_index = pd.Index(catalogue[candidates])
    seen_users = pd.Index(seen["user_id"].astype(str).unique())

    r_user = rows["user_id"].astype(str).to_numpy()
    r_pos = cand_index.get_indexer(rows["item_id"].astype(str))
    keep = (rows[signal].to_numpy() > 0) & (r_pos >= 0) & seen_users.get_indexer(r_user).__ge__(0)
    user_ids = np.unique(r_user[keep])
    user_index = pd.Index(user_ids)
    all_rows_user = user_index.get_indexer(r_user)
    first_row = np.full(len(user_ids), -1, dtype=np.int64)
    order = np.flatnonzero(all_rows_user >= 0)[::-1]  # reversed so the first row per user wins below
    first_row[all_rows_user[order]] = order
    shape = (len(user_ids), len(candidates))
    targets = _pair_matrix(user_index.get_indexer(r_user[keep]), r_pos[keep], shape)

    s_user = user_index.get_indexer(seen["user_id"].astype(str))
    s_pos = cand_index.get_indexer(seen_items)
    ok = (s_user >= 0) & (s_pos >= 0)
    exclude = _pair_matrix(s_user[ok], s_pos[ok], shape)
    return EvalSet(user_ids, first_row, candidates, exclude, targets)


def top_k_stable(s: np.ndarray, k: int) -> np.ndarray:
    """(c, k) column indices of each row's k largest scores, best first, ties to the lower column: the same
    as ``np.argsort(-s, kind="stable")[:, :k]`` but by partition (O(N) per row, not O(N log N))."""
    neg = -s
    if k >= s.shape[1]:
        return np.argsort(neg, axis=1, kind="stable")[:, :k]
    kth = np.partition(neg, k - 1, axis=1)[:, k - 1 : k]  # (c, 1) the k-th best score
    sel = neg <= kth
    over = np.flatnonzero(sel.sum(axis=1) > k)  # rows whose ties at the k-th score run past k
    if len(over):  # keep the tied ones by position, exactly k per row
        n, t = neg[over], kth[over]
        ties = n == t
        room = k - (n < t).sum(axis=1, keepdims=True)
        sel[over] = (n < t) | (ties & (np.cumsum(ties, axis=1) <= room))
    cols = np.nonzero(sel)[1].reshape(len(s), k)  # ascending column within each row
    order = np.argsort(np.take_along_axis(neg, cols, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


def ranked_hits(
    score_chunk: Callable[[np.ndarray], np.ndarray], es: EvalSet, kmax: int, chunk: int = 1024
) -> np.ndarray:
    """(U, kmax) bool: whether the item at each rank is one of the user's targets.

    ``score_chunk(user_positions) -> (c, N)`` float scores over candidates. Excluded items are ranked last;
    ties break toward the lower candidate position (a stable sort), so the result is deterministic.
    """
    n = es.candidates.size
    k = min(kmax, n)
    out = np.zeros((es.n_users, kmax), dtype=bool)
    for lo in range(0, es.n_users, chunk):
        users = np.arange(lo, min(lo + chunk, es.n_users))
        s = np.array(score_chunk(users), copy=True)  # float32 scores stay float32: the same order, half the traffic
        if not np.issubdtype(s.dtype, np.floating):
            s = s.astype(np.float64)
        ex = es.exclude[users]
        ex_rows = np.repeat(np.arange(len(users)), np.diff(ex.indptr))
        s[ex_rows, ex.indices] = -np.inf
        idx = top_k_stable(s, k)
        tg = es.targets[users].toarray().astype(bool)
        tg[ex_rows, ex.indices] = False  # an excluded item is never a hit, even when ranked (last) within k
        out[users, :k] = np.take_along_axis(tg, idx, axis=1)
    return out


def recall_ndcg(hits: np.ndarray, n_pos: np.ndarray, recall_ks: list[int], ndcg_ks: list[int]) -> dict[str, float]:
    """Mean Recall@K and binary-gain NDCG@K over users from a (U, kmax) hit matrix and positives per user."""
    if hits.shape[0] == 0:
        return {**{f"recall@{k}": 0.0 for k in recall_ks}, **{f"ndcg@{k}": 0.0 for k in ndcg_ks}}
    n_pos = np.asarray(n_pos, dtype=np.float64)
    cum = np.cumsum(hits, axis=1)
    out: dict[str, float] = {}
    for k in recall_ks:
        out[f"recall@{k}"] = float(np.mean(cum[:, min(k, hits.shape[1]) - 1] / n_pos))
    for k in ndcg_ks:
        kk = min(k, hits.shape[1])
        ideal = np.arange(kk)[None, :] < n_pos[:, None]  # every positive ranked first
        out[f"ndcg@{k}"] = float(np.mean(ndcg(hits[:, :kk], ideal, kk)))
    return out


def recall_curve(hits: np.ndarray, n_pos: np.ndarray, ks: list[int]) -> list[float]:
    if hits.shape[0] == 0:
        return [0.0] * len(ks)
    cum = np.cumsum(hits, axis=1)
    return [float(np.mean(cum[:, min(k, hits.shape[1]) - 1] / n_pos)) for k in ks]


def popularity_scores(
    seen: pd.DataFrame, catalogue_item_ids: np.ndarray, es: EvalSet, signal: str, recent_from_ts: int
) -> dict[str, np.ndarray]:
    """Baseline scores over the candidates: positives of ``signal`` in all seen rows, and in seen rows
    with ts >= ``recent_from_ts`` (ties in the recent count broken by the all-time count)."""
    cat = pd.Index(np.asarray(catalogue_item_ids).astype(str))[es.candidates]
    pos = seen[seen[signal].to_numpy() > 0]
    p = cat.get_indexer(pos["item_id"].astype(str))
    ok = p >= 0
    n = len(es.candidates)
    pop = np.bincount(p[ok], minlength=n).astype(np.float64)
    recent_mask = ok & (pos["ts"].to_numpy() >= recent_from_ts)
    recent = np.bincount(p[recent_mask], minlength=n).astype(np.float64)
    recent = recent + pop / (pop.max() + 1.0)  # tie-break within equal recent counts, never reorders them
    return {"popularity": pop, "recent_popularity": recent}


def weighted_counts(seen: pd.DataFrame, catalogue_item_ids: np.ndarray, weight: np.ndarray,
                    starts: list[int | None]) -> list[np.ndarray]:
    """Per start, (catalogue,) sum of ``weight`` over the seen rows of each item with ts >= start (None: every
    row); the rows are mapped to the catalogue once for all starts."""
    pos = pd.Index(np.asarray(catalogue_item_ids).astype(str)).get_indexer(seen["item_id"].astype(str))
    known = pos >= 0
    weight = np.asarray(weight, np.float64)
    ts = seen["ts"].to_numpy()
    out = []
    for start in starts:
        ok = known if start is None else known & (ts >= start)
        out.append(np.bincount(pos[ok], weights=weight[ok], minlength=len(catalogue_item_ids)))
    return out


CURVE_KS = [1, 5, 10, 20, 50, 100, 150, 200]


def evaluate_all(
    es: EvalSet,
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    baselines: dict[str, np.ndarray | Callable[[np.ndarray], np.ndarray]],
    recall_ks: list[int],
    ndcg_ks: list[int],
) -> tuple[dict, dict[str, list[float]]]:
    """Metrics JSON "retrieval" section plus recall-vs-K curves for the plot.

    ``user_vecs`` (U, D) in EvalSet user order; ``item_vecs`` (N, D) in candidate order; a baseline is
    one (N,) score vector for every user or a ``score_chunk(user_positions) -> (c, N)`` callable.
    """
    kmax = max(recall_ks + ndcg_ks + CURVE_KS)
    n_pos = np.asarray(es.targets.sum(axis=1)).ravel()
    curve_ks = sorted(set(CURVE_KS + recall_ks))
    uv, iv = user_vecs.astype(np.float32), item_vecs.astype(np.float32)
    hits = ranked_hits(lambda u: uv[u] @ iv.T, es, kmax)
    out = {"model": recall_ndcg(hits, n_pos, recall_ks, ndcg_ks), "baselines": {}, "test_users": int(es.n_users)}
    curves = {"model": recall_curve(hits, n_pos, curve_ks)}
    for name, scores in baselines.items():
        fn = scores if callable(scores) else (lambda u, s=scores: np.broadcast_to(s, (len(u), s.size)))
        bh = ranked_hits(fn, es, kmax)
        out["baselines"][name] = recall_ndcg(bh, n_pos, recall_ks, ndcg_ks)
        curves[name] = recall_curve(bh, n_pos, curve_ks)
    out["candidates"] = int(es.candidates.size)
    out["test_positives"] = int(n_pos.sum())
    return out, {"k": curve_ks, **curves}  # type: ignore[dict-item]


def plot_curves(curves: dict, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        if name != "k":
            ax.plot(curves["k"], ys, marker="o", label=name)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
