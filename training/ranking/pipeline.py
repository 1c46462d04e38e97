"""The ranking stage: train the multi-task ranker and its baselines, evaluate on the test period, export.

Writes into ``out_dir`` (``<output_dir>/ranking``): ``ranker.onnx``, ``ranker_request.onnx``, ``ranking.json``
(:class:`features.contract.RankingSpec`: inputs, heads, scenarios, and parity, calibration, hybrid as extras), ``metrics.json`` (the ``ranking`` section of the metrics JSON), ``per_head.md`` /
``per_head.csv``, ``reliability.png``, ``single_task/<head>.onnx`` and Lightning checkpoints under
``checkpoints/`` (``last.ckpt`` is what ``resume`` continues from).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from features.contract import (RANKER_ONNX, RANKER_REQUEST_ONNX, RANKING_FORMAT_VERSION, RANKING_JSON, Head, RankingSpec,
                               ScoresOutput, WatchTimeOutput)
from features.tables import FeatureTables
from training.config import TrainConfig
from training.onnx_export import OPSET, ParityReport
from training.ranking.data import FeatureLayout
from training.ranking.evaluate import build_report, score_bundle
from training.ranking.export import ExportedGraphs, blended_trees, export_checked, export_graphs, input_specs
from training.ranking.config import RankingConfig
from training.ranking.gbdt import GbdtResult, fit_gbdt, gbdt_matrix, save_boosters, with_rounds
from training.ranking.hybrid import HeadBlend, fit_blend, logistic
from training.ranking.metrics import auc
from training.ranking.model import Ranker, RankerScorer, RankerSpec, embedding_dims
from training.ranking.outputs import jsonable, log_mlflow, markdown, per_head_table, reliability_plot
from training.ranking.prepared import RankingData
from training.ranking.task import MONITOR, KeepBest, RankingTask
from training.ranking.tree_budget import TreeBudget, choose_tree_counts
from training.refit import RefitPlan
from training.stream import stream_callbacks
from training.tracking import active_run_logger
from training.trainer import checkpoint_dir, make_trainer

log = logging.getLogger(__name__)


def _spec(cfg: TrainConfig, layout: FeatureLayout, heads: list[str]) -> RankerSpec:
    rc = cfg.ranking
    return RankerSpec(
        cat_sizes=layout.cat_sizes,
        cat_dims=embedding_dims(layout.cat_sizes, rc.embedding_dim, rc.small_embedding_dim, rc.small_vocab),
        item_position=layout.item_position, n_num=len(layout.num_columns), heads=heads,
        architecture=rc.architecture, expert_hidden=list(rc.expert_hidden), num_experts=rc.num_experts,
        shared_experts=rc.shared_experts, task_experts=rc.task_experts, ple_levels=rc.ple_levels,
        tower_hidden=rc.tower_hidden, dropout=rc.dropout,
    )


def _trainer(cfg: TrainConfig, max_epochs: int, patience: int | None, progress: bool, callbacks: list[L.Callback],
             logger: Any, checkpointing: bool, single_process: bool = False) -> L.Trainer:
    """``patience=None``: a fixed number of epochs with no validation (the production refit)."""
    stop = [] if patience is None else [EarlyStopping(MONITOR, mode="max", patience=patience)]
    return make_trainer(cfg.trainer, max_epochs=max_epochs, min_epochs=max_epochs if patience is None else None,
                        callbacks=[*stop, *callbacks], logger=logger, progress=progress,
                        validate=patience is not None, checkpointing=checkpointing, single_process=single_process)


def _new_task(cfg: TrainConfig, data: RankingData, heads: list[tuple[str, str]], columns: list[int]) -> RankingTask:
    rc = cfg.ranking
    model = Ranker(_spec(cfg, data.layout, [n for n, _ in heads]))
    model.numeric.set_statistics(data.num_stats)
    model.set_head_bias(np.nanmean(data.labels["train"][:, columns], axis=0))
    weights = [rc.loss_weights.get(n, 1.0) for n, _ in heads]
    yv = data.labels["valid"][:, columns]
    monitor = [t for t, (_, k) in enumerate(heads) if k == "binary" and np.nansum(yv[:, t]) >= rc.monitor_min_positives]
    return RankingTask(model, [k for _, k in heads], weights, rc.learning_rate, rc.weight_decay, rc.embedding_l2,
                       [n for n, _ in heads], rc.loss_weighting == "uncertainty", monitor or None,
                       rc.sparse_embeddings)


def platt(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising the log loss of sigmoid(a * logit + b) (scikit-learn's logistic regression, all but
    unregularised); the identity (1, 0) when there is nothing to fit or the fit is not sane."""
    x = np.asarray(logits, np.float64)
    y = np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) == 0 or y.min() == y.max():
        return 1.0, 0.0
    coef, b = logistic(x[:, None], y)
    a = float(coef[0])
    return (a, b) if np.isfinite([a, b]).all() and a > 1e-3 else (1.0, 0.0)


def valid_logits(model: torch.nn.Module, data: RankingData, period: str = "valid") -> np.ndarray:
    """(N, T) logits of a period (default: validation), eval mode."""
    model.eval()
    va = {k: torch.from_numpy(v) for k, v in data.inputs[period].items()}
    with torch.inference_mode():
        return torch.cat([model(va["cat"][a : a + 8192], va["hist"][a : a + 8192], va["num"][a : a + 8192])
                          for a in range(0, len(va["cat"]), 8192)]).numpy()


def _valid_aucs(heads: list[tuple[str, str]], y: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, float]:
    return {n: auc(y[:, t], scores[n]) for t, (n, k) in enumerate(heads) if k == "binary" and n in scores}


def _scorer(task: RankingTask, heads: list[tuple[str, str]], data: RankingData, columns: list[int],
            calibration: dict[str, list[float]] | None = None, gbdt: GbdtResult | None = None,
            seed: int = 0, min_gain: float = 0.0, min_positives: int = 0, interval_samples: int = 200,
            logits: np.ndarray | None = None) -> tuple[RankerScorer, np.ndarray, dict[str, HeadBlend]]:
    """The export wrapper, with binary heads calibrated on the validation period (the watch head predicts a
    quantile and is left as is): Platt scaling of the deep logit or, given ``gbdt`` (the hybrid ranker),
    the head's blend with its GBDT margin where that wins out of sample (on heads with fewer than
    ``min_positives`` validation positives, distinguishably: see :func:`fit_blend`). Also returns the validation
    logits (N_valid, T) and the blends fitted. With a held-out fit's ``calibration`` (the refit, which has
    no validation period) that calibration is used and the logits are empty. ``logits``: the validation
    logits when the caller has them already."""
    w = [t for t, (_, k) in enumerate(heads) if k == "watch_time"]
    scorer = RankerScorer(task.model, w[0] if w else None, data.wtq, data.layout.duration_position).eval()
    if calibration is not None:
        with torch.no_grad():
            for key, buf in (("scale", scorer.calib_scale), ("bias", scorer.calib_bias),
                             ("gbdt_weight", scorer.gbdt_weight)):
                if key in calibration:
                    buf.copy_(torch.tensor(calibration[key], dtype=buf.dtype))
        return scorer, np.zeros((0, len(heads)), np.float32), {}
    logits = valid_logits(task.model, data) if logits is None else logits
    y = data.labels["valid"][:, columns]
    users = data.rows["valid"]["user_id"].to_numpy()
    blends: dict[str, HeadBlend] = {}
    with torch.no_grad():
        for t, (name, kind) in enumerate(heads):
            if kind != "binary":
                continue
            rare = np.nansum(y[:, t]) < min_positives
            blend = (fit_blend(logits[:, t], gbdt.margins["valid"][name], y[:, t], users, seed, min_gain,
                               interval_samples if rare else 0)
                     if gbdt is not None and name in gbdt.margins.get("valid", {}) else None)
            if blend is not None:
                blends[name] = blend
            if blend is not None and blend.used:
                scorer.calib_scale[t], scorer.gbdt_weight[t], scorer.calib_bias[t] = blend.scale, blend.weight, blend.bias
            else:
                a, b = platt(logits[:, t], y[:, t])
                scorer.calib_scale[t], scorer.calib_bias[t] = a, b
    return scorer, logits, blends


def _within_budget(logits: np.ndarray, data: RankingData, heads: list[tuple[str, str]], gbdt: GbdtResult,
                   rc: RankingConfig, seed: int) -> tuple[GbdtResult, TreeBudget | None]:
    """The GBDT the hybrid may blend: every tree, or under ``hybrid_max_trees`` each head's first trees as
    :mod:`training.ranking.tree_budget` chooses on validation (the baseline keeps every tree)."""
    if rc.hybrid_max_trees is None or sum(gbdt.rounds.values()) <= rc.hybrid_max_trees:
        return gbdt, None
    x_valid = gbdt_matrix(data.inputs["valid"])
    index = {n: t for t, (n, _) in enumerate(heads)}
    budget = choose_tree_counts(
        logits, lambda h, n: gbdt.boosters[h].predict(x_valid, num_iteration=n, raw_score=True),
        data.labels["valid"], data.rows["valid"]["user_id"].to_numpy(),
        [(index[h], h, r) for h, r in gbdt.rounds.items()], rc.hybrid_max_trees, rc.hybrid_min_positives, seed,
        rc.hybrid_min_gain)
    log.info("hybrid trees within %d: %s", rc.hybrid_max_trees, budget.chosen)
    return with_rounds(gbdt, budget.chosen, data.inputs, periods=("valid",)), budget  # the blend reads validation


def _fit_main(cfg: TrainConfig, data: RankingData, heads: list[tuple[str, str]], out_dir: Path, resume: bool,
              progress: bool, epochs: int | None = None) -> tuple[RankingTask, dict[str, Any]]:
    """Early stopping and checkpoint selection on validation, or exactly ``epochs`` epochs (refit)."""
    rc = cfg.ranking
    ckpt_dir, last = checkpoint_dir(out_dir, resume, cfg.trainer)
    cols = list(range(len(heads)))
    task = _new_task(cfg, data, heads, cols)
    train_dl, val_dl = data.loaders(cols, rc.batch_size, cfg.seed, cfg.trainer)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=None if epochs else MONITOR,
                                 mode="max", save_last=True, save_top_k=0 if epochs else 1)
    logger: Any = active_run_logger() or False
    trainer = _trainer(cfg, epochs or rc.max_epochs, None if epochs else rc.patience, progress,
                       [checkpoint, *stream_callbacks(train_dl)], logger, checkpointing=True)
    ckpt_path = str(last) if resume and last.exists() else None
    if resume and ckpt_path is None:
        log.warning("--resume: no %s, training from scratch", last)
    trainer.fit(task, train_dl, val_dl, ckpt_path=ckpt_path)
    if not trainer.is_global_zero:
        return task, {"global_rank": trainer.global_rank}
    best = checkpoint.best_model_path if not epochs else ""
    best_epoch = int(trainer.current_epoch) - 1
    if best and Path(best).exists():
        state = torch.load(best, map_location="cpu", weights_only=False)
        task.load_state_dict(state["state_dict"])
        best_epoch = int(state["epoch"])
    info = {
        "epochs": int(trainer.current_epoch),
        "best_epoch": best_epoch,
        # Lightning counts optimizer steps: two per batch with lazy Adam on the id tables.
        "global_step": int(trainer.global_step) // max(1, len(trainer.optimizers)),
        "best_checkpoint": Path(best).name if best else None,
        "best_val_score": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "resumed_from": Path(ckpt_path).name if ckpt_path else None,
        "train_seconds": round(task.train_seconds, 2),
        "train_samples": int(task.train_samples),
        "samples_per_s": round(task.train_samples / task.train_seconds, 1) if task.train_seconds > 0 else None,
        "threads": torch.get_num_threads(),
        "world_size": trainer.world_size,  # train_samples and samples_per_s are rank 0's share
        "val_auc_by_epoch": task.val_history,
    }
    return task, info


def _fit_single(cfg: TrainConfig, data: RankingData, heads: list[tuple[str, str]], t: int, progress: bool) -> RankingTask:
    rc = cfg.ranking
    keep = KeepBest()
    task = _new_task(cfg, data, [heads[t]], [t])
    single = dataclasses.replace(cfg.trainer, devices=1, num_nodes=1, strategy="auto")  # rank 0 alone
    train_dl, val_dl = data.loaders([t], rc.batch_size, cfg.seed, single)
    epochs = rc.single_task_max_epochs or rc.max_epochs
    _trainer(cfg, epochs, rc.patience, progress, [keep, *stream_callbacks(train_dl)], False, checkpointing=False,
             single_process=True).fit(task, train_dl, val_dl)
    if keep.state is not None:
        task.load_state_dict(keep.state)
    return task


def _fit_gbdt(cfg: TrainConfig, data: RankingData, heads: list[tuple[str, str]],
              rounds: dict[str, int] | None = None) -> GbdtResult:
    lay = data.layout
    return fit_gbdt(cfg.ranking, data.inputs, data.labels, heads, lay.cat_columns, lay.cat_sizes, lay.num_columns,
                    cfg.seed, threads=torch.get_num_threads(), rounds=rounds)


def _baseline_scores(task: RankingTask, heads: list[tuple[str, str]], data: RankingData, gbdt: GbdtResult | None,
                     logits_valid: np.ndarray, trees: GbdtResult | None) -> dict[str, dict[str, np.ndarray]]:
    """Test-period probabilities of the GBDT and, when the served ranker is a hybrid, of its deep part alone
    (Platt-calibrated on validation), so the table shows what each component brings."""
    out: dict[str, dict[str, np.ndarray]] = {}
    if gbdt is not None:
        out["gbdt"] = gbdt.scores("test")
    if trees is not None:
        logits = valid_logits(task.model, data, "test")
        yv = data.labels["valid"]
        deep = {}
        for t, (name, kind) in enumerate(heads):
            if kind == "binary":
                a, b = platt(logits_valid[:, t], yv[:, t])
                deep[name] = (1.0 / (1.0 + np.exp(-(a * logits[:, t] + b)))).astype(np.float32)
        out["deep"] = deep
    return out


@dataclass
class _SingleTasks:
    files: dict[str, str] = field(default_factory=dict)  # head -> single_task/<head>.onnx
    parity: dict[str, float] = field(default_factory=dict)
    valid_logits: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


def _fit_single_tasks(cfg: TrainConfig, data: RankingData, heads: list[tuple[str, str]], out_dir: Path,
                      progress: bool) -> _SingleTasks:
    """One model per head, same inputs and training: the reference the multi-task ranker must not trail."""
    out, t0 = _SingleTasks(), time.perf_counter()
    for t, (name, _) in enumerate(heads):
        L.seed_everything(cfg.seed, workers=False, verbose=False)
        st = _fit_single(cfg, data, heads, t, progress)
        rel = f"single_task/{name}.onnx"
        st_scorer, st_logits, _ = _scorer(st, [heads[t]], data, [t])
        out.valid_logits[name] = st_logits[:, 0]
        out.parity[name] = export_checked(st_scorer, data, out_dir / rel, cfg.seed).max_scaled_diff
        out.files[name] = rel
        log.info("single-task %s: %.1fs", name, time.perf_counter() - t0)
    out.seconds = time.perf_counter() - t0
    return out


def _ranking_spec(cfg: TrainConfig, data: RankingData, heads: list[tuple[str, str]], scorer: RankerScorer,
                  graphs: ExportedGraphs, trees: GbdtResult | None, blends: dict, singles: _SingleTasks,
                  train_info: dict[str, Any], out_dir: Path, refit: RefitPlan | None,
                  budget: TreeBudget | None = None) -> RankingSpec:
    rc = cfg.ranking
    parity = graphs.parity
    spec = RankingSpec(
        format_version=RANKING_FORMAT_VERSION,
        onnx=RANKER_ONNX,
        # Serving scores one request's candidates with this graph (identical results, user side once).
        request_onnx=RANKER_REQUEST_ONNX,
        opset=OPSET,
        inputs=input_specs(data),
        outputs=(ScoresOutput("scores", "float32", ["batch", len(heads)], [n for n, _ in heads],
                              "sigmoid per head; watch_time = watch quantile"),
                 WatchTimeOutput("watch_time_s", "float32", ["batch"], "s") if data.wtq else None),
        heads=[Head(n, k, i, rc.loss_weights.get(n, 1.0),
                    int(data.train_positives[n]) if k == "binary" else None)
               for i, (n, k) in enumerate(heads)],
        scenarios=rc.scenarios,
        other={
            "request_constant": {"cat": graphs.const_cat, "num": graphs.const_num},
            "request_parity_max_scaled_diff": graphs.request_parity.max_scaled_diff,
            "architecture": rc.architecture,
            "fusion": "score = sum_h w_h * scores[:, h] (watch_time: quantile)",
            "watch_time": data.wtq.to_json() if data.wtq else None,
            "layout": data.layout.to_json(),
            "model": _spec(cfg, data.layout, [n for n, _ in heads]).to_json(),
            "parity_max_abs_diff": parity.max_abs_diff,
            "parity_max_scaled_diff": parity.max_scaled_diff,
            "parity_per_output": parity.per_output,
            "calibration": {"method": ("sigmoid(scale * logit + gbdt_weight * gbdt_margin + bias) per binary head, "
                                       "fitted on the validation period" + (" of the held-out fit" if refit else "")),
                            "scale": scorer.calib_scale.tolist(), "bias": scorer.calib_bias.tolist(),
                            "gbdt_weight": scorer.gbdt_weight.tolist()},
            # The hybrid ranker: which heads blend their GBDT into the graph (chosen on validation), with how
            # many trees; the refit retrains those trees on every day.
            # (The refit reuses the held-out fit's choice, so its "heads" is empty.)
            "hybrid": {"enabled": bool(rc.hybrid), "gbdt_rounds": dict(trees.rounds) if trees else {},
                       "max_trees": rc.hybrid_max_trees, "budget": budget.to_json() if budget else None,
                       # what each saved GBDT was fitted to (the baseline), where the graph serves fewer
                       "baseline_rounds": dict(trees.baseline_rounds or trees.rounds) if trees else {},
                       "gbdt_files": save_boosters(trees, out_dir) if trees else {},
                       "gbdt_features": trees.feature_names if trees else [],
                       "heads": {h: b.to_json() for h, b in blends.items()}},
            "single_task": singles.files,
            "single_task_parity_max_scaled_diff": singles.parity,
            "training": train_info,
        },
    )
    if refit is not None:
        spec.other["refit"] = {"epochs": refit.epochs, "rows": data.train_rows,
                               "held_out_metrics": {h: {k: m.get(k) for k in ("auc", "gauc", "logloss")}
                                                    for h, m in refit.held_out.get("model", {}).items()}}
    return spec


def _test_report(cfg: TrainConfig, data: RankingData, heads: list[tuple[str, str]], meta: dict[str, Any],
                 task: RankingTask, gbdt: GbdtResult | None, trees: GbdtResult | None, blends: dict,
                 logits_valid: np.ndarray, singles: _SingleTasks, train_info: dict[str, Any], parity: ParityReport,
                 out_dir: Path, t_start: float) -> dict[str, Any]:
    """Test-period evaluation through ONNX Runtime (what is measured is what ships), and its files."""
    rc = cfg.ranking
    t_eval = time.perf_counter()
    model_out, single_out = score_bundle(out_dir, meta, data.inputs["test"])
    test = data.rows["test"]
    report = build_report(test, heads, data.wtq, rc.scenarios, model_out, single_out or None, rc.ece_bins,
                          rc.fusion_k, cfg.seed, _baseline_scores(task, heads, data, gbdt, logits_valid, trees),
                          rc.rare_head_positives,
                          rc.bootstrap_samples)
    yv = data.labels["valid"]
    report["validation"] = {"model": _valid_aucs(heads, yv, {n: logits_valid[:, t] for t, (n, _) in enumerate(heads)})}
    if singles.valid_logits:
        report["validation"]["single_task"] = _valid_aucs(heads, yv, singles.valid_logits)
    if gbdt:
        report["validation"]["gbdt"] = _valid_aucs(heads, yv, gbdt.scores("valid"))
    if blends:
        report["hybrid"] = {h: b.to_json() for h, b in blends.items()}
    if (meta.get("hybrid") or {}).get("budget"):
        report["hybrid_budget"] = meta["hybrid"]["budget"]
    gbdt_info = ({"gbdt": {"fit_seconds": gbdt.fit_seconds, "samples_per_s": gbdt.samples_per_s,
                           "rounds": gbdt.rounds, "features": len(gbdt.feature_names)}} if gbdt else {})
    report["training"] = {**train_info, **gbdt_info, "single_task_seconds": round(singles.seconds, 1),
                          "eval_seconds": round(time.perf_counter() - t_eval, 1),
                          "wall_seconds": round(time.perf_counter() - t_start, 1)}
    if data.eval_sample:  # training.stream_eval_rows: these periods were read for a sample of their users
        report["evaluation_sample"] = data.eval_sample
    report["parity_max_abs_diff"] = parity.max_abs_diff
    report["parity_max_scaled_diff"] = parity.max_scaled_diff
    report = jsonable(report)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=1))
    table = per_head_table(report)
    table.to_csv(out_dir / "per_head.csv", index=False)
    (out_dir / "per_head.md").write_text(markdown(table))
    reliability_plot(test, heads, model_out[0], out_dir / "reliability.png", rc.ece_bins)
    files = [out_dir / f for f in (RANKING_JSON, "metrics.json", "per_head.csv", "per_head.md", "reliability.png",
                                   RANKER_ONNX, RANKER_REQUEST_ONNX)]
    files += [out_dir / f for f in singles.files.values()]
    log_mlflow({k: v for k, v in report.items() if k != "training"} | {"training": {**train_info, **gbdt_info}},
               out_dir, files)
    return report


def fit_ranking(cfg: TrainConfig, tables: FeatureTables, out_dir: Path, resume: bool = False,
                progress: bool = True, refit: RefitPlan | None = None) -> dict:
    """Fit, export and evaluate on the test period; with ``refit``, train every row for the plan's epochs
    with its calibration, export, and return only what the refit did (no period is left to test on)."""
    t_start = time.perf_counter()
    rc = cfg.ranking
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    heads = rc.resolve_heads(list(tables.spec["binary_signals"]), tables.spec.get("watch_time_signal"))
    L.seed_everything(cfg.seed, workers=False, verbose=False)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")  # shards are disjoint
    data = RankingData(cfg, tables, heads, refit=refit is not None)

    task, train_info = _fit_main(cfg, data, heads, out_dir, resume, progress, refit.epochs if refit else None)
    if "global_rank" in train_info:  # another rank of a distributed fit: rank 0 does the rest
        return {}
    # The GBDT: the baseline, and the hybrid ranker's second component (refit: the blended heads only).
    gbdt = None
    if refit is None and (rc.gbdt_baseline or rc.hybrid):
        gbdt = _fit_gbdt(cfg, data, heads)
    elif refit is not None and rc.hybrid and refit.gbdt_rounds:
        gbdt = _fit_gbdt(cfg, data, heads, rounds=refit.gbdt_rounds)
    offered, budget, logits = gbdt if rc.hybrid else None, None, None
    if offered is not None and refit is None:
        logits = valid_logits(task.model, data)
        offered, budget = _within_budget(logits, data, heads, offered, rc, cfg.seed)
    elif offered is not None and refit.gbdt_served:  # the held-out fit's cut, on trees refitted to its full counts
        offered = with_rounds(offered, refit.gbdt_served, data.inputs, periods=())  # calibration comes from the plan
    scorer, logits_valid, blends = _scorer(task, heads, data, list(range(len(heads))),
                                           refit.calibration if refit else None, offered, cfg.seed,
                                           rc.hybrid_min_gain, rc.hybrid_min_positives, rc.bootstrap_samples, logits)
    trees = blended_trees(scorer, offered) if rc.hybrid else None
    graphs = export_graphs(scorer, data, out_dir, cfg.seed, trees, rc.parity_tolerance)
    # Single-task baselines exist to be compared on the test period: not in the refit.
    singles = (_fit_single_tasks(cfg, data, heads, out_dir, progress)
               if rc.single_task_baselines and refit is None else _SingleTasks())
    spec = _ranking_spec(cfg, data, heads, scorer, graphs, trees, blends, singles, train_info, out_dir, refit, budget)
    meta = jsonable(spec.to_json())
    (out_dir / RANKING_JSON).write_text(json.dumps(meta, indent=1))
    if refit is not None:
        report = jsonable({"training": train_info, "parity_max_scaled_diff": graphs.parity.max_scaled_diff,
                           "wall_seconds": round(time.perf_counter() - t_start, 1)})
        log_mlflow(report, out_dir, [out_dir / f for f in (RANKING_JSON, RANKER_ONNX, RANKER_REQUEST_ONNX)],
                   "refit/ranking")
        return report
    return _test_report(cfg, data, heads, meta, task, gbdt, trees, blends, logits_valid, singles, train_info,
                        graphs.parity, out_dir, t_start)
