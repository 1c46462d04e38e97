"""The GBDT: one LightGBM model per binary head on exactly the ranker's input columns (the ``cat`` indices,
small vocabularies as categorical features, id-like ones as plain codes, and the raw ``num`` values, NaN as
missing), early-stopped on validation AUC. It is the baseline the ranker is judged against and, in the
hybrid ranker (``ranking.hybrid``), a component of the served graph (:mod:`training.ranking.gbdt_onnx`).
The user's history sequence is the one ranker input it does not read: trees take no sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Collection

import numpy as np
import torch

from training.ranking.config import RankingConfig


@dataclass
class GbdtResult:
    boosters: dict[str, Any]  # head -> lightgbm.Booster
    rounds: dict[str, int]  # head -> trees used (the best iteration when early-stopped)
    margins: dict[str, dict[str, np.ndarray]]  # period -> head -> (N,) raw margins (logits)
    fit_seconds: float
    samples_per_s: float  # train rows x boosting rounds per second, over all heads
    feature_names: list[str]
    # The trees each head was fitted to, where ``rounds`` (what the hybrid serves) cuts them: the bundle keeps
    # every fitted tree, so the GBDT baseline stays what was fitted (None: ``rounds`` is what was fitted).
    baseline_rounds: dict[str, int] | None = None

    def scores(self, period: str) -> dict[str, np.ndarray]:
        """head -> (N,) probabilities."""
        return {h: (1.0 / (1.0 + np.exp(-m))).astype(np.float32) for h, m in self.margins.get(period, {}).items()}


def gbdt_matrix(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """(N, k + n) float32: the categorical indices then the numeric values."""
    return np.concatenate([inputs["cat"].astype(np.float32), inputs["num"].astype(np.float32)], axis=1)


def fit_gbdt(rc: RankingConfig, inputs: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray],
             heads: list[tuple[str, str]], cat_columns: list[str], cat_sizes: list[int], num_columns: list[str],
             seed: int, threads: int = 2, rounds: dict[str, int] | None = None) -> GbdtResult:
    """``inputs[period]`` as :meth:`FeatureLayout.arrays`, ``labels[period]`` (N, T) aligned with ``heads``.
    Early stopping on the ``valid`` period; with ``rounds`` (the production refit) exactly that many trees
    for the heads it names, no validation, and no other head. Margins for every period but ``train``."""
    import lightgbm as lgb

    names = [f"cat_{c}" for c in cat_columns] + [f"num_{c}" for c in num_columns]
    categorical = [i for i, s in enumerate(cat_sizes) if s <= rc.gbdt_max_categorical]
    x = {p: gbdt_matrix(v) for p, v in inputs.items() if len(v["cat"])}
    params = {
        "objective": "binary", "metric": "auc", "learning_rate": rc.gbdt_learning_rate,
        "num_leaves": rc.gbdt_num_leaves, "min_data_in_leaf": rc.gbdt_min_data_in_leaf,
        "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
        "num_threads": threads, "seed": seed, "verbosity": -1, "deterministic": True, "force_col_wise": True,
    }
    boosters, used, margins, work = {}, {}, {p: {} for p in x if p != "train"}, 0.0
    t0 = time.perf_counter()
    for t, (name, kind) in enumerate(heads):
        if kind != "binary" or (rounds is not None and name not in rounds):
            continue
        ytr = labels["train"][:, t]
        ok_tr = ~np.isnan(ytr)
        dtr = lgb.Dataset(x["train"][ok_tr], ytr[ok_tr], feature_name=names, categorical_feature=categorical,
                          free_raw_data=False)
        if rounds is not None:
            booster = lgb.train(params, dtr, num_boost_round=max(1, int(rounds[name])))
            best = booster.current_iteration()
        else:
            yva = labels["valid"][:, t]
            ok_va = ~np.isnan(yva)
            dva = lgb.Dataset(x["valid"][ok_va], yva[ok_va], reference=dtr)
            booster = lgb.train(params, dtr, num_boost_round=rc.gbdt_max_rounds, valid_sets=[dva],
                                callbacks=[lgb.early_stopping(rc.gbdt_early_stopping, verbose=False)])
            best = booster.best_iteration or booster.current_iteration()
        boosters[name], used[name] = booster, int(best)
        work += ok_tr.sum() * booster.current_iteration()
        for p in margins:
            margins[p][name] = booster.predict(x[p], num_iteration=best, raw_score=True).astype(np.float32)
    seconds = time.perf_counter() - t0
    return GbdtResult(boosters, used, margins, round(seconds, 2), round(work / seconds, 1) if seconds > 0 else 0.0,
                      names)


def with_rounds(result: GbdtResult, rounds: dict[str, int], inputs: dict[str, dict[str, np.ndarray]],
                periods: Collection[str] | None = None) -> GbdtResult:
    """The heads ``rounds`` names, each cut to its first ``rounds[head]`` trees (the hybrid's trees under its
    budget), with the margins of ``periods`` (None: every period the result has) recomputed where trees were
    cut; other periods' margins are left out."""
    rounds = {h: int(n) for h, n in rounds.items() if h in result.boosters}
    cut = [h for h in rounds if rounds[h] < result.rounds[h]]
    margins = {}
    for period, per_head in result.margins.items():
        if periods is not None and period not in periods:
            continue
        x = gbdt_matrix(inputs[period]) if cut else None
        margins[period] = {h: (result.boosters[h].predict(x, num_iteration=rounds[h], raw_score=True).astype(np.float32)
                               if h in cut else m) for h, m in per_head.items() if h in rounds}
    fitted = result.baseline_rounds or result.rounds
    return replace(result, boosters={h: result.boosters[h] for h in rounds}, rounds=rounds, margins=margins,
                   baseline_rounds={h: fitted[h] for h in rounds})


def gbdt_margins(result: GbdtResult, heads: list[str], inputs: dict[str, np.ndarray]) -> np.ndarray:
    """(N, T) float32 raw margins of every head with a booster (0 elsewhere), for any inputs."""
    x = gbdt_matrix(inputs)
    out = np.zeros((len(x), len(heads)), np.float32)
    for t, name in enumerate(heads):
        if name in result.boosters:
            out[:, t] = result.boosters[name].predict(x, num_iteration=result.rounds[name], raw_score=True)
    return out
class WithTrees(torch.nn.Module):
    """Eager reference of a hybrid graph: ``graph`` (a scorer taking ``gbdt_margin``) fed LightGBM's own
    margins; parity checks the tree ensemble spliced into the ONNX graph against it."""

    def __init__(self, graph: torch.nn.Module, gbdt: GbdtResult, heads: list[str]):
        super().__init__()
        self.graph, self.gbdt, self.heads = graph, gbdt, heads

    @property
    def ranker(self) -> torch.nn.Module:
        return self.graph.ranker

    @property
    def output_names(self) -> list[str]:
        return self.graph.output_names

    def forward(self, cat: torch.Tensor, hist: torch.Tensor, num: torch.Tensor) -> tuple[torch.Tensor, ...]:
        margin = gbdt_margins(self.gbdt, self.heads, {"cat": cat.numpy(), "num": num.numpy()})
        return self.graph(cat, hist, num, torch.from_numpy(margin))


def save_boosters(result: GbdtResult, out_dir: Path) -> dict[str, str]:
    """LightGBM text models under ``out_dir/gbdt/`` with every fitted tree (``baseline_rounds``; the hybrid
    reads the first ``rounds``); head -> path relative to ``out_dir``."""
    (out_dir / "gbdt").mkdir(parents=True, exist_ok=True)
    fitted = result.baseline_rounds or result.rounds
    files = {}
    for head, booster in result.boosters.items():
        rel = f"gbdt/{head}.txt"
        booster.save_model(str(out_dir / rel), num_iteration=fitted[head])
        files[head] = rel
    return files


def load_boosters(out_dir: Path, files: dict[str, str], rounds: dict[str, int]) -> GbdtResult:
    import lightgbm as lgb

    boosters = {h: lgb.Booster(model_file=str(Path(out_dir) / rel)) for h, rel in files.items()}
    return GbdtResult(boosters, {h: int(rounds[h]) for h in files}, {}, 0.0, 0.0, [])
