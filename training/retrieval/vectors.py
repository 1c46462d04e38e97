"""What the served retrieval vectors hold besides the towers' outputs: the popularity prior the logQ
correction removed (one extra dimension, weight beta) and optionally ALS matrix-factorisation dimensions,
so that one FAISS inner-product search serves ``u.v + w * mf_u.mf_v + beta * log prior``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from features.split import DAY_MS
from features.tables import FeatureTables
from training.retrieval.baselines import als_factors
from training.retrieval.config import RetrievalConfig
from training.retrieval.data import InputLayout, ItemFeatures
from training.retrieval.metrics import EvalSet, weighted_counts
from training.retrieval.task import ValInputs, prior_sweep

log = logging.getLogger(__name__)


def log_prior(rc: RetrievalConfig, seen: pd.DataFrame, item_ids: np.ndarray, end_ts: int) -> np.ndarray:
    """(catalogue,) log(1 + training weight of the item's rows), over the last ``prior_days`` before
    ``end_ts`` (all seen rows when 0): the popularity the logQ correction took out of u.v."""
    from_ts = int(end_ts - rc.prior_days * DAY_MS) if rc.prior_days > 0 else None
    return np.log1p(weighted_counts(seen, item_ids, rc.row_weights(seen), from_ts)).astype(np.float32)


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


def with_mf(uv: np.ndarray, iv: np.ndarray, mf: MFDims | None, user_cat: torch.Tensor,
             candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tower vectors with the MF dimensions appended, as the exported user tower and item vectors lay them out."""
    if mf is None:
        return uv, iv
    return (np.hstack([uv, mf.table[user_cat[:, 0].numpy()]]).astype(np.float32),
            np.hstack([iv, mf.items[candidates]]).astype(np.float32))


def choose_mf_weight(rc: RetrievalConfig, tuning: dict, train: pd.DataFrame, feats: ItemFeatures, tables: FeatureTables,
              layout: InputLayout, val: ValInputs, es: EvalSet, uv: np.ndarray, iv: np.ndarray, ks: list[int],
              seed: int) -> tuple[MFDims | None, float, dict, dict]:
    """(the MF dimensions at the chosen weight, None for weight 0; prior beta; the prior sweep at that
    weight; recall@k by weight): chosen together on validation, MF fitted on the train period with the
    tuned baseline's settings."""
    key = f"recall@{ks[0]}"
    weights = sorted(set(rc.mf_weights)) if "mf" in tuning else [0.0]
    if weights == [0.0]:
        beta, sweep = prior_sweep(es, uv, iv, val.prior, list(rc.prior_betas), ks, [])
        return None, beta, sweep, {}
    unit = mf_fit(rc, train, feats.item_ids, tables, layout.user_cat_sizes[0], tuning["mf"]["params"], 1.0, seed)
    best, by_weight = None, {}
    for w in weights:
        mf = MFDims(w, unit.table * np.float32(w), unit.items) if w > 0 else None
        beta, sweep = prior_sweep(es, *with_mf(uv, iv, mf, val.user_cat, es.candidates), val.prior,
                                  list(rc.prior_betas), ks, [])
        by_weight[str(w)] = {"beta": beta, key: sweep[beta][key]}
        log.info("MF weight %s: beta %s, valid %s %.4f", w, beta, key, sweep[beta][key])
        if best is None or sweep[beta][key] > best[2][best[1]][key]:
            best = (mf, beta, sweep)
    assert best is not None
    return best[0], best[1], best[2], by_weight
