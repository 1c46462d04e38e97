"""The GBDT baseline: one LightGBM model per binary head on exactly the ranker's input columns (the
``cat`` indices, small vocabularies as categorical features, id-like ones as plain codes, and the raw
``num`` values, NaN as missing), early-stopped on validation AUC. The user's history sequence is the one
ranker input it does not read: trees take no sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from training.ranking.config import RankingConfig


@dataclass
class GbdtResult:
    scores: dict[str, np.ndarray]  # head -> (N_test,) probabilities
    valid_scores: dict[str, np.ndarray]  # head -> (N_valid,) probabilities
    rounds: dict[str, int]  # head -> best iteration
    fit_seconds: float
    samples_per_s: float  # train rows x boosting rounds per second, over all heads
    feature_names: list[str]


def gbdt_matrix(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """(N, k + n) float32: the categorical indices then the numeric values."""
    return np.concatenate([inputs["cat"].astype(np.float32), inputs["num"].astype(np.float32)], axis=1)


def fit_gbdt(rc: RankingConfig, inputs: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray],
             heads: list[tuple[str, str]], cat_columns: list[str], cat_sizes: list[int], num_columns: list[str],
             seed: int, threads: int = 2) -> GbdtResult:
    """``inputs[period]`` as :meth:`FeatureLayout.arrays`, ``labels[period]`` (N, T) aligned with ``heads``."""
    import lightgbm as lgb

    names = [f"cat_{c}" for c in cat_columns] + [f"num_{c}" for c in num_columns]
    categorical = [i for i, s in enumerate(cat_sizes) if s <= rc.gbdt_max_categorical]
    x = {p: gbdt_matrix(v) for p, v in inputs.items()}
    params = {
        "objective": "binary", "metric": "auc", "learning_rate": rc.gbdt_learning_rate,
        "num_leaves": rc.gbdt_num_leaves, "min_data_in_leaf": rc.gbdt_min_data_in_leaf,
        "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
        "num_threads": threads, "seed": seed, "verbosity": -1, "deterministic": True, "force_col_wise": True,
    }
    scores, valid, rounds, work = {}, {}, {}, 0.0
    t0 = time.perf_counter()
    for t, (name, kind) in enumerate(heads):
        if kind != "binary":
            continue
        ytr, yva = labels["train"][:, t], labels["valid"][:, t]
        ok_tr, ok_va = ~np.isnan(ytr), ~np.isnan(yva)
        dtr = lgb.Dataset(x["train"][ok_tr], ytr[ok_tr], feature_name=names, categorical_feature=categorical,
                          free_raw_data=False)
        dva = lgb.Dataset(x["valid"][ok_va], yva[ok_va], reference=dtr)
        booster = lgb.train(params, dtr, num_boost_round=rc.gbdt_max_rounds, valid_sets=[dva],
                            callbacks=[lgb.early_stopping(rc.gbdt_early_stopping, verbose=False)])
        best = booster.best_iteration or booster.current_iteration()
        rounds[name] = int(best)
        work += ok_tr.sum() * booster.current_iteration()
        scores[name] = booster.predict(x["test"], num_iteration=best).astype(np.float32)
        valid[name] = booster.predict(x["valid"], num_iteration=best).astype(np.float32)
    seconds = time.perf_counter() - t0
    return GbdtResult(scores, valid, rounds, round(seconds, 2), round(work / seconds, 1) if seconds > 0 else 0.0, names)
