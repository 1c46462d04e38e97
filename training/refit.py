"""Production refit: after a held-out fit has chosen the epoch counts (early stopping on validation) and the
ranker's calibration, both stages are trained again on every day up to the end of the data, so the served
bundle knows the newest items, users and aggregates. The reported metrics stay those of the held-out fit:
the refit has no period left to measure itself on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.config import SplitConfig
from training.config import TrainConfig

REFIT_DIR = "refit"


@dataclass(frozen=True)
class RefitPlan:
    """What a stage's refit reuses from its held-out fit."""

    epochs: int  # train exactly this many epochs (no validation, no early stopping)
    held_out: dict[str, Any] = field(default_factory=dict)  # the held-out fit's metrics, carried into the meta
    calibration: dict[str, list[float]] | None = None  # ranking: scale / bias (/ gbdt_weight) per head, from validation
    gbdt_rounds: dict[str, int] | None = None  # ranking, hybrid: trees to fit per head whose GBDT the graph blends in
    gbdt_served: dict[str, int] | None = None  # ranking, hybrid: of those, the first trees served (the trees' budget)


def refit_config(cfg: TrainConfig) -> TrainConfig:
    """The same recipe with every row in train, writing under ``<output_dir>/refit``."""
    out = copy.deepcopy(cfg)
    out.output_dir = str(Path(cfg.output_dir) / REFIT_DIR)
    out.split = SplitConfig(mode="all", train_block_hours=cfg.split.train_block_hours)
    return out


def _epochs(stage: str, metrics: dict[str, Any], key: str) -> int:
    training = metrics.get("training", {})
    best = training.get(key)
    if best is None:
        raise ValueError(f"cannot refit {stage}: its held-out fit recorded no '{key}' (re-run the fit without --stage)")
    return int(best) + 1  # epochs are counted from 0


def retrieval_plan(metrics: dict[str, Any]) -> RefitPlan:
    return RefitPlan(epochs=_epochs("retrieval", metrics, "best_epoch"), held_out=metrics)


def ranking_plan(metrics: dict[str, Any], ranking_meta: dict[str, Any]) -> RefitPlan:
    calib = ranking_meta.get("calibration", {})
    calibration = {"scale": list(calib["scale"]), "bias": list(calib["bias"])}
    if "gbdt_weight" in calib:
        calibration["gbdt_weight"] = list(calib["gbdt_weight"])
    hybrid = ranking_meta.get("hybrid") or {}
    served = {h: int(r) for h, r in (hybrid.get("gbdt_rounds") or {}).items()}
    fitted = {h: int(r) for h, r in (hybrid.get("baseline_rounds") or {}).items()} or served
    return RefitPlan(epochs=_epochs("ranking", metrics, "best_epoch"), held_out=metrics, calibration=calibration,
                     gbdt_rounds=fitted or None, gbdt_served=served if served != fitted else None)


def run_refit(cfg: TrainConfig, metrics: dict[str, Any], progress: bool = True) -> Path:
    """Build the all-days features and refit both stages under ``<output_dir>/refit``; returns that folder,
    whose ``features``, ``retrieval`` and ``ranking`` make the served bundle. ``metrics['refit']`` says what
    the refit trained."""
    import json

    from features.build import build_features
    from features.contract import RANKING, RANKING_JSON
    from features.tables import FeatureTables
    from training.ranking.pipeline import fit_ranking
    from training.retrieval.pipeline import fit_retrieval
    from training.trainer import broadcast, is_global_zero

    out = Path(cfg.output_dir)
    rcfg = refit_config(cfg)
    plans = None
    if is_global_zero(cfg.trainer):
        for stage in ("retrieval", "ranking"):
            if stage not in metrics:
                raise ValueError(f"refit needs the held-out {stage} fit first (run `training fit` with --stage all)")
        ranking_meta = json.loads((out / RANKING / RANKING_JSON).read_text())
        plans = (retrieval_plan(metrics["retrieval"]), ranking_plan(metrics["ranking"], ranking_meta))
        built = build_features(rcfg, progress=progress)
    # A distributed fit: the other ranks wait here for rank 0's features and plans, then join both refits.
    retrieval, ranking = broadcast(plans)
    tables = FeatureTables.load(rcfg.features_dir)
    root = Path(rcfg.output_dir)
    fitted = {"retrieval": fit_retrieval(rcfg, tables, root / "retrieval", progress=progress, refit=retrieval),
              "ranking": fit_ranking(rcfg, tables, root / "ranking", progress=progress, refit=ranking)}
    if is_global_zero(cfg.trainer):
        metrics["refit"] = {"rows": built.manifest["rows"]["train"], "time_range": built.manifest["split"]["iso"],
                            **fitted}
    return root
