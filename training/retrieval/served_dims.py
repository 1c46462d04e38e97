"""The served vectors' extra dimensions, computed from a log alone (no torch, so the offline evaluation can
rebuild them as of a period's start): the popularity prior the logQ correction removed and the ALS
matrix-factorisation factors. How they are chosen and folded next to the towers: :mod:`.vectors`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.split import DAY_MS
from features.tables import FeatureTables
from training.retrieval.baselines import als_factors
from training.retrieval.config import RetrievalConfig
from training.retrieval.metrics import weighted_counts


def log_priors(rc: RetrievalConfig, seen: pd.DataFrame, item_ids: np.ndarray, end_ts: int,
               days: list[float]) -> dict[float, np.ndarray]:
    """Per window in ``days``, (catalogue,) log(1 + training weight of the item's rows) over the last that many
    days before ``end_ts`` (all seen rows for 0): the popularity the logQ correction took out of u.v. The
    rows' weights and items are read once for every window."""
    starts = [int(end_ts - d * DAY_MS) if d > 0 else None for d in days]
    counts = weighted_counts(seen, item_ids, rc.row_weights(seen), starts)
    return {float(d): np.log1p(c).astype(np.float32) for d, c in zip(days, counts)}


def log_prior(rc: RetrievalConfig, seen: pd.DataFrame, item_ids: np.ndarray, end_ts: int, days: float) -> np.ndarray:
    """:func:`log_priors` for one window."""
    return log_priors(rc, seen, item_ids, end_ts, [days])[float(days)]


def with_prior(uv: np.ndarray, iv: np.ndarray, beta: float, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[u, beta] and [v, prior]: the folded vectors whose inner product is u.v + beta * prior."""
    return (np.hstack([uv, np.full((len(uv), 1), beta, np.float32)]),
            np.hstack([iv, prior.reshape(-1, 1).astype(np.float32)]))


@dataclass
class MFDims:
    """The MF dimensions of the served vectors: ``table`` (user vocabulary, f) = weight x ALS user factors by
    ``user_id_idx`` (row 0, the unknown user, and users ALS never saw are 0), ``items`` (catalogue, f)."""

    weight: float
    table: np.ndarray
    items: np.ndarray


def mf_fit(rc: RetrievalConfig, seen: pd.DataFrame, item_ids: np.ndarray, tables: FeatureTables, vocab_size: int,
            params: dict, weight: float, seed: int) -> MFDims:
    users, uf, itf = als_factors(seen, item_ids, rc.positive_signal, int(params["factors"]),
                                 params["regularization"], params["alpha"], params["impression_weight"],
                                 rc.baselines.als_iterations, seed)
    pos = users.get_indexer(tables.users["user_id"].astype(str))
    idx = tables.users["user_id_idx"].to_numpy(np.int64)
    ok = (pos >= 0) & (idx > 0)
    table = np.zeros((vocab_size, uf.shape[1]), np.float32)
    table[idx[ok]] = uf[pos[ok]] * np.float32(weight)
    return MFDims(float(weight), table, itf)
