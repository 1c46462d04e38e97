"""What the served retrieval vectors hold besides the towers' outputs: the popularity prior the logQ
correction removed (one extra dimension, weight beta) and optionally ALS matrix-factorisation dimensions,
so that one FAISS inner-product search serves ``u.v + w * mf_u.mf_v + beta * log prior``."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from features.tables import FeatureTables
from training.retrieval.config import RetrievalConfig
from training.retrieval.data import InputLayout, ItemFeatures
from training.retrieval.metrics import EvalSet
from training.retrieval.served_dims import MFDims, mf_fit
from training.retrieval.task import PriorChoice, ValInputs, prior_sweep

log = logging.getLogger(__name__)


def with_mf(uv: np.ndarray, iv: np.ndarray, mf: MFDims | None, user_cat: torch.Tensor,
             candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tower vectors with the MF dimensions appended, as the exported user tower and item vectors lay them out."""
    if mf is None:
        return uv, iv
    return (np.hstack([uv, mf.table[user_cat[:, 0].numpy()]]).astype(np.float32),
            np.hstack([iv, mf.items[candidates]]).astype(np.float32))


def choose_mf_weight(rc: RetrievalConfig, tuning: dict, train: pd.DataFrame, feats: ItemFeatures, tables: FeatureTables,
              layout: InputLayout, val: ValInputs, es: EvalSet, uv: np.ndarray, iv: np.ndarray, ks: list[int],
              seed: int) -> tuple[MFDims | None, PriorChoice, dict, dict]:
    """(the MF dimensions at the chosen weight, None for weight 0; the prior's window and beta; the prior
    sweep at that weight; recall@k by weight): chosen together on validation, MF fitted on the train period
    with the tuned baseline's settings."""
    key = f"recall@{ks[0]}"
    weights = sorted(set(rc.mf_weights)) if "mf" in tuning else [0.0]
    if weights == [0.0]:
        prior, sweep = prior_sweep(es, uv, iv, val.priors, list(rc.prior_betas), ks, [])
        return None, prior, sweep, {}
    unit = mf_fit(rc, train, feats.item_ids, tables, layout.user_cat_sizes[0], tuning["mf"]["params"], 1.0, seed)
    best, by_weight = None, {}
    for w in weights:
        mf = MFDims(w, unit.table * np.float32(w), unit.items) if w > 0 else None
        prior, sweep = prior_sweep(es, *with_mf(uv, iv, mf, val.user_cat, es.candidates), val.priors,
                                   list(rc.prior_betas), ks, [])
        by_weight[str(w)] = {"beta": prior.beta, "prior_days": prior.days, key: sweep[prior][key]}
        log.info("MF weight %s: prior %s days, beta %s, valid %s %.4f", w, prior.days, prior.beta, key,
                 sweep[prior][key])
        if best is None or sweep[prior][key] > best[2][best[1]][key]:
            best = (mf, prior, sweep)
    assert best is not None
    return best[0], best[1], best[2], by_weight
