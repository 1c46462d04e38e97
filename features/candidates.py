"""Candidate channels beside the two-tower ANN, as plain arrays both layers share (no torch): the
co-visitation table, the trending and fresh lists, each user's seen set, the matrix-factorisation
channel's top items, and the quota merge.

Training builds the tables from the bundle's log and stores them in ``retrieval/channels.npz``; serving
reads them back and merges the channels per request with the same :func:`merge_channels`, and the offline
evaluation uses the same function, so the recall measured is the recall served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.split import DAY_MS

CHANNELS = ("ann", "covisit", "trending", "fresh", "mf")


def covisit_matrix(user: np.ndarray, item: np.ndarray, ts: np.ndarray, n_items: int, window: int) -> sp.csr_matrix:
    """Symmetric (N, N) co-visitation weights: two positives of one user at most ``window`` apart in the
    user's time order, weighted 1 / distance. ``item`` are item positions in 0..n_items-1.

    Summed one distance at a time: holding every distance's pairs at once cost ~24 bytes per pair (2.3 GiB
    on a 10M-row log); the running sum holds each distinct pair once."""
    order = np.lexsort((ts, user))
    u, it = user[order], item[order].astype(np.int32 if n_items < 2**31 else np.int64)
    total = sp.csr_matrix((n_items, n_items), dtype=np.float64)
    for d in range(1, window + 1):
        same = u[d:] == u[:-d]
        a, b = it[:-d][same], it[d:][same]
        keep = a != b
        pairs = sp.csr_matrix((np.full(int(keep.sum()), 1.0 / d), (a[keep], b[keep])), shape=(n_items, n_items))
        total = total + pairs + pairs.T
    return total.astype(np.float32).tocsr()


def row_normalise(c: sp.csr_matrix) -> sp.csr_matrix:
    """Each row sums to 1 (a history item spreads one vote over its neighbours)."""
    deg = np.asarray(c.sum(axis=1)).ravel()
    return (sp.diags(1.0 / np.maximum(deg, 1e-9)).astype(np.float32) @ c).tocsr()


def top_per_row(c: sp.csr_matrix, top: int) -> sp.csr_matrix:
    """Keep each row's ``top`` largest entries (ties: lower column first): a compact table to serve."""
    c = c.tocsr()
    rows, cols, vals = [], [], []
    for r in range(c.shape[0]):
        lo, hi = c.indptr[r], c.indptr[r + 1]
        if hi == lo:
            continue
        idx, v = c.indices[lo:hi], c.data[lo:hi]
        keep = np.lexsort((idx, -v))[:top]
        rows.append(np.full(len(keep), r))
        cols.append(idx[keep])
        vals.append(v[keep])
    if not rows:
        return sp.csr_matrix(c.shape, dtype=np.float32)
    out = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=c.shape,
                        dtype=np.float32)
    out.sort_indices()
    return out


def history_weights(history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(items, weights) of one user's history (most recent last, 0 = padding): weight 1 for the newest
    down to 1/L, the same recency weighting as :func:`recent_positions`."""
    h = history[history > 0]
    return h, (1.0 / np.arange(len(h), 0, -1)).astype(np.float32)


def covisit_top(table: sp.csr_matrix, items: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Top-``n`` columns of sum_i weights[i] * table[items[i]] (ties: lower column first)."""
    if not len(items) or n <= 0:
        return np.zeros(0, np.int64)
    cols, vals = [], []
    for i, w in zip(items.tolist(), weights.tolist()):
        lo, hi = table.indptr[i], table.indptr[i + 1]
        cols.append(table.indices[lo:hi])
        vals.append(table.data[lo:hi] * w)
    c, v = np.concatenate(cols), np.concatenate(vals)
    if not len(c):
        return np.zeros(0, np.int64)
    uniq, inv = np.unique(c, return_inverse=True)
    score = np.bincount(inv, weights=v)
    order = np.lexsort((uniq, -score))[:n]
    return uniq[order].astype(np.int64)


def mf_top(user_factors: np.ndarray, item_factors: np.ndarray, blocked: np.ndarray, n: int) -> np.ndarray:
    """The MF channel: top-``n`` rows by ``item_factors @ user_factors`` among rows not ``blocked`` (ties:
    lower row first). Empty for a user the ALS fit never saw (all-zero factors): every score would tie."""
    if n <= 0 or not np.any(user_factors):
        return np.zeros(0, np.int64)
    score = item_factors @ user_factors
    score[blocked] = -np.inf
    k = min(n, len(score) - int(blocked.sum()))
    if k <= 0:
        return np.zeros(0, np.int64)
    top = np.argpartition(-score, k - 1)[:k]
    return top[np.lexsort((top, -score[top]))].astype(np.int64)


def merge_channels(lists: dict[str, np.ndarray], quotas: dict[str, int], blocked: np.ndarray,
                   fill_from: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Merge ranked candidate lists: channels in ``quotas`` order, each adding up to its quota of items not
    ``blocked`` (a bool mask over rows: seen, excluded, not servable) and not taken by an earlier channel.
    With ``fill_from``, what the channels leave of the quotas' total (a co-visitation channel finds little
    for a user with a short history) is filled from that list, so every user gets the full set.

    Returns (rows, channel index into ``channel_order(quotas, fill_from)``)."""
    taken = blocked.copy()
    rows, tags = [], []

    def add(cand: np.ndarray, n: int, ci: int) -> None:
        cand = cand[~taken[cand]]
        cand = cand[np.sort(np.unique(cand, return_index=True)[1])][:n]  # first copy, ranked order
        taken[cand] = True
        rows.append(cand)
        tags.append(np.full(len(cand), ci, np.int8))

    for ci, (name, quota) in enumerate(quotas.items()):
        cand = lists.get(name)
        if cand is not None and quota > 0 and len(cand):
            add(cand, quota, ci)
    short = sum(max(q, 0) for q in quotas.values()) - sum(len(r) for r in rows)
    if fill_from is not None and short > 0 and len(lists.get(fill_from, ())):
        add(lists[fill_from], short, channel_order(quotas, fill_from).index(fill_from))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int8)
    return np.concatenate(rows).astype(np.int64), np.concatenate(tags)


def channel_order(quotas: dict[str, int], fill_from: str | None = None) -> list[str]:
    """The channel names :func:`merge_channels`' tags index: the quotas' order, then ``fill_from`` if new."""
    names = list(quotas)
    return names + [fill_from] if fill_from is not None and fill_from not in names else names


@dataclass
class ChannelTables:
    """What the channels need, over catalogue rows (items.parquet order) and users.parquet rows.

    ``covisit`` (N, N) CSR, top neighbours per item; ``trending`` rows by recent popularity; ``fresh``
    rows newest upload first; ``seen`` (U, N) CSR of every item shown to the user in the bundle's data."""

    covisit: sp.csr_matrix
    trending: np.ndarray
    fresh: np.ndarray
    seen: sp.csr_matrix

    def save(self, path: str | Path) -> None:
        c, s = self.covisit.tocsr(), self.seen.tocsr()
        np.savez_compressed(
            path, covisit_indptr=c.indptr.astype(np.int64), covisit_indices=c.indices.astype(np.int32),
            covisit_data=c.data.astype(np.float32), n_items=np.int64(c.shape[0]),
            trending=self.trending.astype(np.int32), fresh=self.fresh.astype(np.int32),
            seen_indptr=s.indptr.astype(np.int64), seen_indices=s.indices.astype(np.int32), n_users=np.int64(s.shape[0]),
        )

    @classmethod
    def load(cls, path: str | Path) -> "ChannelTables":
        z = np.load(path, allow_pickle=False)
        n, u = int(z["n_items"]), int(z["n_users"])
        cov = sp.csr_matrix((z["covisit_data"], z["covisit_indices"], z["covisit_indptr"]), shape=(n, n))
        seen = sp.csr_matrix((np.ones(len(z["seen_indices"]), np.int8), z["seen_indices"], z["seen_indptr"]),
                             shape=(u, n))
        return cls(cov, z["trending"].astype(np.int64), z["fresh"].astype(np.int64), seen)

    def list_rank(self, name: str) -> np.ndarray:
        """(N,) each catalogue row's position in the ``trending`` or ``fresh`` list; rows off it rank last
        (the list's length)."""
        order = getattr(self, name)
        rank = np.full(self.covisit.shape[0], len(order), np.float64)
        rank[order] = np.arange(len(order))
        return rank

    def seen_rows(self, user_row: int) -> np.ndarray:
        if user_row < 0 or user_row >= self.seen.shape[0]:
            return np.zeros(0, np.int64)
        return self.seen.indices[self.seen.indptr[user_row]:self.seen.indptr[user_row + 1]].astype(np.int64)


def build_channel_tables(rows: pd.DataFrame, items: pd.DataFrame, user_ids: np.ndarray, signal: str,
                         window: int, top: int, recent_days: float, end_ts: int) -> ChannelTables:
    """Tables from ``rows`` (user_id, item_id, ts, signal) over catalogue rows and ``user_ids`` rows, as of
    ``end_ts`` (trending counts the ``recent_days`` before it); training ships them, the offline evaluation
    rebuilds them from the rows before a period."""
    cat = pd.Index(items["item_id"].astype(str))
    n = len(cat)
    item = cat.get_indexer(rows["item_id"].astype(str))
    pos = (rows[signal].to_numpy() > 0) & (item >= 0)
    users = pd.Index(rows["user_id"].astype(str)).factorize()[0] if len(rows) else np.zeros(0, np.int64)
    ts = rows["ts"].to_numpy()
    cov = top_per_row(row_normalise(covisit_matrix(users[pos], item[pos], ts[pos], n, window)), top)
    recent = pos & (ts >= end_ts - recent_days * DAY_MS)
    pop = np.bincount(item[pos], minlength=n).astype(np.float64)
    trend_score = np.bincount(item[recent], minlength=n) + pop / (pop.max(initial=0) + 1.0)
    trending = np.lexsort((np.arange(n), -trend_score))
    trending = trending[trend_score[trending] > 0]
    up = items["upload_ts"].to_numpy(np.float64) if "upload_ts" in items else np.full(n, np.nan)
    fresh = np.lexsort((np.arange(n), -np.nan_to_num(up, nan=-np.inf)))
    fresh = fresh[np.isfinite(up[fresh])]
    u = pd.Index(np.asarray(user_ids).astype(str)).get_indexer(rows["user_id"].astype(str))
    ok = (u >= 0) & (item >= 0)
    seen = sp.csr_matrix((np.ones(int(ok.sum()), np.int8), (u[ok], item[ok])), shape=(len(user_ids), n))
    seen.sum_duplicates()
    seen.data[:] = 1
    return ChannelTables(cov, trending.astype(np.int64), fresh.astype(np.int64), seen)
