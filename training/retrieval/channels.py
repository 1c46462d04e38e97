"""Multi-channel candidates offline: build the tables serving needs (co-visitation, trending, fresh, seen
sets) from a log, and measure Recall@K of each channel alone and of the quota merge on an EvalSet, with the
same merge code serving runs (:mod:`features.candidates`). Quotas are chosen on validation.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from features.candidates import ChannelTables, build_channel_tables, covisit_top, history_weights, merge_channels
from features.metrics import paired_difference
from features.tables import FeatureTables
from training.retrieval.config import RetrievalConfig
from training.retrieval.data import InputLayout, ItemFeatures
from training.retrieval.metrics import EvalSet, top_k_stable


def channel_lists(es: EvalSet, scores: np.ndarray, histories: np.ndarray, idx_to_row: np.ndarray,
                  tables: ChannelTables, user: int, n: int, mf: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One evaluated user's ranked catalogue rows per channel (``scores`` and the MF channel's ``mf`` (N,)
    over es.candidates; no MF channel without them or for a user the ALS fit never saw: all scores 0)."""
    reach = n + es.exclude[user].nnz
    reach = min(reach, len(es.candidates))
    ann = es.candidates[top_k_stable(scores[None], reach)[0]]
    items, w = history_weights(histories[user])
    rows = idx_to_row[np.minimum(items, len(idx_to_row) - 1)]
    keep = (items < len(idx_to_row)) & (rows >= 0)
    lists = {"ann": ann, "covisit": covisit_top(tables.covisit, rows[keep], w[keep], n),
             "trending": tables.trending[: n + 300], "fresh": tables.fresh[: n + 300]}
    if mf is not None and np.any(mf):
        lists["mf"] = es.candidates[top_k_stable(mf[None], reach)[0]]
    return lists


def quota_grid(total: int, covisit: list[int], trending: list[int], fresh: list[int],
               mf: list[int] = (0,)) -> list[dict[str, int]]:
    out = []
    for c, t, f, m in itertools.product(covisit, trending, fresh, mf):
        if c + t + f + m <= total:
            mix = {"ann": total - c - t - f - m, "covisit": c, "trending": t, "fresh": f}
            if m:
                mix["mf"] = m
            out.append(mix)
    return out


def merged_recall(es: EvalSet, score_chunk, histories: np.ndarray, idx_to_row: np.ndarray,
                  tables: ChannelTables, n_items: int, grid: list[dict[str, int]], mf_chunk=None,
                  seed: int = 0) -> dict:
    """Recall@total of each channel alone (its top ``total``) and of every quota mix in ``grid``;
    ``mf_chunk(users)`` gives the MF channel's scores (None: no MF channel). With one mix, also its
    difference to the best single channel with a paired user-bootstrap interval (``vs_best_single``).

    Excluded (seen) items are removed from every channel, as serving removes them."""
    total = sum(grid[0].values())
    names = ("ann", "covisit", "trending", "fresh") + (("mf",) if mf_chunk else ())
    single = {c: np.zeros(es.n_users) for c in names}  # per-user recall, for the paired interval
    mixes = np.zeros((len(grid), es.n_users))
    for lo in range(0, es.n_users, 512):
        users = np.arange(lo, min(lo + 512, es.n_users))
        chunk = score_chunk(users)
        mf = mf_chunk(users) if mf_chunk else None
        for j, u in enumerate(users):
            blocked = np.zeros(n_items, bool)
            blocked[es.candidates[es.exclude[u].indices]] = True
            targets = es.candidates[es.targets[u].indices]
            lists = channel_lists(es, chunk[j], histories, idx_to_row, tables, u, total,
                                  None if mf is None else mf[j])
            for name in single:
                got, _ = merge_channels(lists, {name: total}, blocked)
                single[name][u] = np.isin(targets, got).sum() / len(targets)
            for g, quotas in enumerate(grid):
                got, _ = merge_channels(lists, quotas, blocked, "ann")  # as served (serving.fill_from_ann)
                mixes[g, u] = np.isin(targets, got).sum() / len(targets)
    mean = (lambda v: float(v.mean())) if es.n_users else (lambda v: 0.0)
    out = {"k": total, "single": {k: mean(v) for k, v in single.items()},
           "merged": [{"quotas": q, f"recall@{total}": mean(r)} for q, r in zip(grid, mixes)]}
    if len(grid) == 1 and es.n_users:  # one mix measured (the test period): how it compares, with an interval
        best = max(single, key=lambda c: out["single"][c])
        out["vs_best_single"] = {"channel": best, **paired_difference(mixes[0], single[best], seed)}
    return out


def channel_recall(rc: RetrievalConfig, seen: pd.DataFrame, period: pd.DataFrame, es: EvalSet, layout: InputLayout,
              feats: ItemFeatures, tables: FeatureTables, window: int, start: int, score_chunk,
              grid: list[dict[str, int]] | None, mf_chunk=None) -> dict:
    """Recall@channel_total of each channel and of the quota mixes, tables built from ``seen`` only. The MF
    channel (``mf_chunk``) is tried only where the served vectors carry MF dimensions."""
    ch = build_channel_tables(seen, tables.items, np.zeros(0, str), rc.positive_signal, window, rc.covisit_top,
                      rc.recent_days, start)
    hist = layout.user_arrays(period.iloc[es.first_row])["history"]
    grid = grid or quota_grid(rc.channel_total, rc.channel_covisit, rc.channel_trending, rc.channel_fresh,
                              rc.channel_mf if mf_chunk else [0])
    return merged_recall(es, score_chunk, hist, idx_to_row(tables), ch, len(feats.item_ids), grid, mf_chunk)


def idx_to_row(tables: FeatureTables) -> np.ndarray:
    idx = tables.items["item_id_idx"].to_numpy(np.int64)
    out = np.full(int(idx.max(initial=0)) + 1, -1, np.int64)
    out[idx[idx > 0]] = np.flatnonzero(idx > 0)
    return out
