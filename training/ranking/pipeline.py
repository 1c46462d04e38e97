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
import math
import shutil
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from features.contract import (RANKER_ONNX, RANKER_REQUEST_ONNX, RANKING_FORMAT_VERSION, RANKING_JSON, CatInput, Head,
                               HistInput, NumInput, RankingSpec, ScoresOutput, WatchTimeOutput)
from features.tables import FeatureTables
from training.config import TrainConfig, TrainerConfig
from training.onnx_export import OPSET, ParityReport, check_parity, export_onnx
from training.ranking.data import BatchDataset, FeatureLayout, loader
from training.ranking.evaluate import build_report, score_bundle
from training.ranking.gbdt import GbdtResult, WithTrees, fit_gbdt, save_boosters
from training.ranking.gbdt_onnx import splice_trees
from training.ranking.hybrid import HeadBlend, fit_blend, logistic
from training.ranking.metrics import auc
from training.ranking.model import NumericNormalizer, Ranker, RankerScorer, RankerSpec, RequestScorer, embedding_dims
from training.ranking.task import MONITOR, ActiveRunLogger, KeepBest, RankingTask
from training.ranking.watch_time import WatchTimeQuantiles
from training.refit import RefitPlan
from training.stream import ParquetStream, StreamEpoch, read_period, sample_period
from training.trainer import batch_sampler, is_global_zero, make_trainer, shard

log = logging.getLogger(__name__)


def _labels(rows: pd.DataFrame, heads: list[tuple[str, str]], wtq: WatchTimeQuantiles | None) -> np.ndarray:
    cols = []
    for name, kind in heads:
        if kind == "watch_time":
            assert wtq is not None
            cols.append(wtq.encode(rows["duration_ms"].to_numpy(np.float64), rows[name].to_numpy(np.float64)))
        else:
            cols.append(rows[name].to_numpy(np.float64))
    return np.stack(cols, axis=1).astype(np.float32)


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


class _Data:
    """Inputs and labels of the three periods, built once and shared by every model of the run."""

    def __init__(self, cfg: TrainConfig, tables: FeatureTables, heads: list[tuple[str, str]], refit: bool = False):
        self.layout = FeatureLayout.from_tables(tables)
        self.tables, self.heads, self.training = tables, heads, cfg.training
        self.path = Path(tables.dir) / tables.manifest["tables"]["interactions"]["file"]
        binary = [n for n, k in heads if k == "binary"]
        if cfg.training.stream:
            # The train period stays on disk (ParquetStream); a uniform sample of it stands in for it below.
            self.train_rows = int(tables.manifest["rows"]["train"])
            sample, self.train_positives = sample_period(self.path, "train", self.train_rows,
                                                         cfg.training.stream_sample_rows, cfg.seed, binary)
            self.rows = {"train": self.layout.prepare(sample, tables),
                         **{p: self.layout.prepare(read_period(self.path, p), tables) for p in ("valid", "test")}}
        else:
            inter = pd.read_parquet(self.path)
            frame = self.layout.prepare(inter, tables)
            self.rows = {p: frame[frame["period"] == p].reset_index(drop=True) for p in ("train", "valid", "test")}
            self.train_rows = len(self.rows["train"])
            self.train_positives = {n: float(np.nansum(self.rows["train"][n].to_numpy(np.float64))) for n in binary}
        for p, r in self.rows.items():
            if r.empty and not (refit and p != "train"):
                raise ValueError(f"the {p} period has no rows in {tables.dir}; check the split config")
        watch = [n for n, k in heads if k == "watch_time"]
        tr = self.rows["train"]
        rc = cfg.ranking
        self.wtq = (WatchTimeQuantiles.fit(tr["duration_ms"].to_numpy(), tr[watch[0]].to_numpy(),
                                           rc.watch_time_buckets, rc.watch_time_grid) if watch else None)
        self.inputs = {p: self.layout.arrays(r) for p, r in self.rows.items()}
        self.labels = {p: _labels(r, heads, self.wtq) for p, r in self.rows.items()}
        self.num_stats = NumericNormalizer.statistics(self.inputs["train"]["num"])

    def _stream_arrays(self, rows: pd.DataFrame, columns: list[int]) -> dict[str, np.ndarray]:
        prepared = self.layout.prepare(rows, self.tables)
        return {**self.layout.arrays(prepared), "y": _labels(prepared, self.heads, self.wtq)[:, columns]}

    def loaders(self, columns: list[int], batch_size: int, seed: int, tc: TrainerConfig) -> tuple[Any, Any]:
        """Training batches (this rank's shard in a distributed fit, see ``tc``; streamed from disk with
        ``training.stream``) and whole validation."""
        if self.training.stream:
            rank, world = shard(tc)
            stream = ParquetStream(self.path, "train", self.train_rows, partial(self._stream_arrays, columns=columns),
                                   batch_size, self.training.stream_buffer_rows, seed, rank, world,
                                   self.training.stream_workers)
            train = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.training.stream_workers)
        else:
            tr = BatchDataset(self.inputs["train"], self.labels["train"][:, columns])
            train = torch.utils.data.DataLoader(tr, sampler=batch_sampler(len(tr), batch_size, True, seed, tc),
                                                batch_size=None, num_workers=0)
        if self.rows["valid"].empty:
            return train, None
        va = BatchDataset(self.inputs["valid"], self.labels["valid"][:, columns])
        return train, loader(va, 8192, False, seed)


def _stream_callbacks(train_dl: Any) -> list[L.Callback]:
    return [StreamEpoch(train_dl.dataset)] if isinstance(train_dl.dataset, ParquetStream) else []


def _new_task(cfg: TrainConfig, data: _Data, heads: list[tuple[str, str]], columns: list[int]) -> RankingTask:
    rc = cfg.ranking
    model = Ranker(_spec(cfg, data.layout, [n for n, _ in heads]))
    model.numeric.set_statistics(data.num_stats)
    model.set_head_bias(np.nanmean(data.labels["train"][:, columns], axis=0))
    weights = [rc.loss_weights.get(n, 1.0) for n, _ in heads]
    yv = data.labels["valid"][:, columns]
    monitor = [t for t, (_, k) in enumerate(heads) if k == "binary" and np.nansum(yv[:, t]) >= rc.monitor_min_positives]
    return RankingTask(model, [k for _, k in heads], weights, rc.learning_rate, rc.weight_decay, rc.embedding_l2,
                       [n for n, _ in heads], rc.loss_weighting == "uncertainty", monitor or None)


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


def valid_logits(model: torch.nn.Module, data: _Data, period: str = "valid") -> np.ndarray:
    """(N, T) logits of a period (default: validation), eval mode."""
    model.eval()
    va = {k: torch.from_numpy(v) for k, v in data.inputs[period].items()}
    with torch.inference_mode():
        return torch.cat([model(va["cat"][a : a + 8192], va["hist"][a : a + 8192], va["num"][a : a + 8192])
                          for a in range(0, len(va["cat"]), 8192)]).numpy()


def _valid_aucs(heads: list[tuple[str, str]], y: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, float]:
    return {n: auc(y[:, t], scores[n]) for t, (n, k) in enumerate(heads) if k == "binary" and n in scores}


def _scorer(task: RankingTask, heads: list[tuple[str, str]], data: _Data, columns: list[int],
            calibration: dict[str, list[float]] | None = None, gbdt: GbdtResult | None = None,
            seed: int = 0, min_gain: float = 0.0,
            min_positives: int = 0) -> tuple[RankerScorer, np.ndarray, dict[str, HeadBlend]]:
    """The export wrapper, with binary heads calibrated on the validation period (the watch head predicts a
    quantile and is left as is): Platt scaling of the deep logit or, given ``gbdt`` (the hybrid ranker),
    the head's blend with its GBDT margin where that wins out of sample (heads with ``min_positives``
    validation positives or more). Also returns the validation
    logits (N_valid, T) and the blends fitted. With a held-out fit's ``calibration`` (the refit, which has
    no validation period) that calibration is used and the logits are empty."""
    w = [t for t, (_, k) in enumerate(heads) if k == "watch_time"]
    scorer = RankerScorer(task.model, w[0] if w else None, data.wtq, data.layout.duration_position).eval()
    if calibration is not None:
        with torch.no_grad():
            for key, buf in (("scale", scorer.calib_scale), ("bias", scorer.calib_bias),
                             ("gbdt_weight", scorer.gbdt_weight)):
                if key in calibration:
                    buf.copy_(torch.tensor(calibration[key], dtype=buf.dtype))
        return scorer, np.zeros((0, len(heads)), np.float32), {}
    logits = valid_logits(task.model, data)
    y = data.labels["valid"][:, columns]
    users = data.rows["valid"]["user_id"].to_numpy()
    blends: dict[str, HeadBlend] = {}
    with torch.no_grad():
        for t, (name, kind) in enumerate(heads):
            if kind != "binary":
                continue
            enough = np.nansum(y[:, t]) >= min_positives
            blend = (fit_blend(logits[:, t], gbdt.margins["valid"][name], y[:, t], users, seed, min_gain)
                     if gbdt is not None and enough and name in gbdt.margins.get("valid", {}) else None)
            if blend is not None:
                blends[name] = blend
            if blend is not None and blend.used:
                scorer.calib_scale[t], scorer.gbdt_weight[t], scorer.calib_bias[t] = blend.scale, blend.weight, blend.bias
            else:
                a, b = platt(logits[:, t], y[:, t])
                scorer.calib_scale[t], scorer.calib_bias[t] = a, b
    return scorer, logits, blends


def _blended(scorer: RankerScorer, gbdt: GbdtResult | None) -> GbdtResult | None:
    """The GBDT reduced to the heads the scorer blends in (None: a deep-only graph)."""
    if gbdt is None:
        return None
    heads = scorer.ranker.spec.heads
    used = {h for t, h in enumerate(heads) if float(scorer.gbdt_weight[t]) != 0.0 and h in gbdt.boosters}
    if not used:
        return None
    return GbdtResult({h: b for h, b in gbdt.boosters.items() if h in used},
                      {h: r for h, r in gbdt.rounds.items() if h in used}, {}, gbdt.fit_seconds, gbdt.samples_per_s,
                      gbdt.feature_names)


def _export(scorer: RankerScorer, data: _Data, path: Path, seed: int, graph: torch.nn.Module | None = None,
            shape=None, trees: GbdtResult | None = None) -> ParityReport:
    """Export ``graph`` (default: the scorer itself) with a dynamic batch and check it against the eager
    scorer on fresh random inputs (passed through ``shape``, e.g. :func:`request_shaped`, when given).
    With ``trees`` (the hybrid ranker) the GBDT margins become a tree ensemble inside the same graph."""
    example = {k: torch.from_numpy(v[:4]) for k, v in data.inputs["train"].items()}
    heads = scorer.ranker.spec.heads
    if trees is not None:
        example["gbdt_margin"] = torch.zeros((4, len(heads)), dtype=torch.float32)
    export_onnx(graph if graph is not None else scorer, example, path, scorer.output_names)
    reference: torch.nn.Module = scorer
    if trees is not None:
        index = {h: t for t, h in enumerate(heads)}
        splice_trees(path, {index[h]: b for h, b in trees.boosters.items()},
                     {index[h]: r for h, r in trees.rounds.items()}, len(heads))
        reference = WithTrees(scorer, trees, heads)
    make = random_inputs(data.layout, data.inputs["train"]["num"], seed)
    return check_parity(reference, path, shape(make) if shape else make)


def request_shaped(make, const_cat: list[int], const_num: list[int]):
    """``make`` turned into one request's inputs: every row carries row 0's shared columns and history."""

    def request(b: int) -> dict[str, torch.Tensor]:
        x = make(b)
        x["cat"][:, const_cat] = x["cat"][:1, const_cat]
        x["num"][:, const_num] = x["num"][:1, const_num]
        x["hist"][:] = x["hist"][:1]
        return x

    return request


def random_inputs(layout: FeatureLayout, num_reference: np.ndarray, seed: int):
    """Fresh inputs in each column's valid range (numeric: resampled train values, some NaN)."""
    gen = np.random.default_rng(seed + 1)

    def make(b: int) -> dict[str, torch.Tensor]:
        cat = np.stack([gen.integers(0, s, b) for s in layout.cat_sizes], axis=1).astype(np.int64)
        hist = gen.integers(0, layout.cat_sizes[layout.item_position], (b, layout.history_length)).astype(np.int64)
        hist[:, gen.integers(0, layout.history_length + 1):] = 0
        num = num_reference[gen.integers(0, len(num_reference), b)].copy()
        num[gen.random(num.shape) < 0.02] = np.nan
        return {"cat": torch.from_numpy(cat), "hist": torch.from_numpy(hist), "num": torch.from_numpy(num)}

    return make


def _fit_main(cfg: TrainConfig, data: _Data, heads: list[tuple[str, str]], out_dir: Path, resume: bool,
              progress: bool, epochs: int | None = None) -> tuple[RankingTask, dict[str, Any]]:
    """Early stopping and checkpoint selection on validation, or exactly ``epochs`` epochs (refit)."""
    rc = cfg.ranking
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if not resume and ckpt_dir.exists() and is_global_zero(cfg.trainer):
        shutil.rmtree(ckpt_dir)  # a fresh fit must not pick up another run's "best"
    cols = list(range(len(heads)))
    task = _new_task(cfg, data, heads, cols)
    train_dl, val_dl = data.loaders(cols, rc.batch_size, cfg.seed, cfg.trainer)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=None if epochs else MONITOR,
                                 mode="max", save_last=True, save_top_k=0 if epochs else 1)
    logger: Any = False
    import mlflow

    run = mlflow.active_run()
    if run is not None:
        logger = ActiveRunLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run.info.run_id)
    trainer = _trainer(cfg, epochs or rc.max_epochs, None if epochs else rc.patience, progress,
                       [checkpoint, *_stream_callbacks(train_dl)], logger, checkpointing=True)
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
        "global_step": int(trainer.global_step),
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


def _fit_single(cfg: TrainConfig, data: _Data, heads: list[tuple[str, str]], t: int, progress: bool) -> RankingTask:
    rc = cfg.ranking
    keep = KeepBest()
    task = _new_task(cfg, data, [heads[t]], [t])
    single = dataclasses.replace(cfg.trainer, devices=1, num_nodes=1, strategy="auto")  # rank 0 alone
    train_dl, val_dl = data.loaders([t], rc.batch_size, cfg.seed, single)
    epochs = rc.single_task_max_epochs or rc.max_epochs
    _trainer(cfg, epochs, rc.patience, progress, [keep, *_stream_callbacks(train_dl)], False, checkpointing=False,
             single_process=True).fit(task, train_dl, val_dl)
    if keep.state is not None:
        task.load_state_dict(keep.state)
    return task


def _fit_gbdt(cfg: TrainConfig, data: _Data, heads: list[tuple[str, str]],
              rounds: dict[str, int] | None = None) -> GbdtResult:
    lay = data.layout
    return fit_gbdt(cfg.ranking, data.inputs, data.labels, heads, lay.cat_columns, lay.cat_sizes, lay.num_columns,
                    cfg.seed, threads=torch.get_num_threads(), rounds=rounds)


def _baseline_scores(task: RankingTask, heads: list[tuple[str, str]], data: _Data, gbdt: GbdtResult | None,
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


def _per_head_table(report: dict[str, Any]) -> pd.DataFrame:
    rows = []
    bases = [("single_task", "single_task"), ("item_rate", "item_rate"), ("gbdt", "gbdt"), ("deep", "deep")]
    for head, m in report["model"].items():
        row: dict[str, Any] = {"head": head, "positives": m["positives"], "impressions": m["impressions"]}
        for metric in ("auc", "gauc", "logloss"):
            row[metric] = m[metric]
            for key, label in bases:
                row[f"{metric}_{label}"] = report["baselines"].get(key, {}).get(head, {}).get(metric)
        ci = m.get("auc_ci95")
        row["auc_ci95"] = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        row["vs_item_rate"] = m.get("vs_item_rate", "")
        row["ece"], row["ece_quantile"] = m["ece"], m["ece_quantile"]
        rows.append(row)
    return pd.DataFrame(rows)


def _markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    fmt = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def reliability_plot(rows: pd.DataFrame, heads: list[tuple[str, str]], scores: np.ndarray, path: Path, bins: int) -> None:
    """Observed rate vs mean prediction per equal-mass bin, one panel per binary head (log axes: rare
    heads live near 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.ranking.metrics import calibration_bins

    binary = [(t, n) for t, (n, k) in enumerate(heads) if k == "binary"]
    ncol = 4
    nrow = math.ceil(len(binary) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.6 * nrow), squeeze=False)
    for ax in axes.flat[len(binary):]:
        ax.axis("off")
    for ax, (t, name) in zip(axes.flat, binary):
        tab = calibration_bins(rows[name].to_numpy(), scores[:, t], bins, "quantile")
        lo = max(min(tab["pred"].min(), tab["rate"][tab["rate"] > 0].min() if (tab["rate"] > 0).any() else 1), 1e-5)
        ax.plot([lo, 1], [lo, 1], color="grey", lw=0.8, ls="--")
        ax.plot(tab["pred"], tab["rate"].clip(lower=lo / 2), marker="o", ms=3)
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.set_title(f"{name} (n+={int(rows[name].sum())})", fontsize=9)
        ax.set_xlabel("mean prediction", fontsize=8); ax.set_ylabel("observed rate", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _log_mlflow(report: dict[str, Any], out_dir: Path, files: list[Path], prefix: str = "ranking") -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    flat: dict[str, float] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            key = f"{prefix}/{k}".replace("@", "_at_")
            if isinstance(v, dict):
                walk(v, key)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                flat[key] = float(v)

    walk(report, prefix)
    mlflow.log_metrics(flat)
    for f in files:
        if f.exists():
            mlflow.log_artifact(str(f), artifact_path=prefix if f.parent == out_dir else f"{prefix}/{f.parent.name}")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _inputs(data: _Data) -> tuple[CatInput, HistInput, NumInput]:
    """The ranker's three inputs as ``ranking.json`` describes them to serving."""
    layout = data.layout
    log1p = [c for c, m in zip(layout.num_columns, data.num_stats["log_mask"]) if m > 0]
    return (CatInput("cat", "int64", ["batch", len(layout.cat_columns)], layout.cat_columns, layout.cat_vocabs,
                     layout.cat_sources, oov=0),
            HistInput("hist", "int64", ["batch", layout.history_length], layout.history_column, layout.history_vocab,
                      padding=0, source="users:history"),
            NumInput("num", "float32", ["batch", len(layout.num_columns)], layout.num_columns, layout.num_sources,
                     missing="NaN (the model uses the train mean)", log1p=log1p))


def fit_ranking(cfg: TrainConfig, tables: FeatureTables, out_dir: Path, resume: bool = False,
                progress: bool = True, refit: RefitPlan | None = None) -> dict:
    """Fit, export and evaluate on the test period; with ``refit``, train every row for the plan's epochs
    with its calibration, export, and return only what the refit did (no period is left to test on)."""
    t_start = time.perf_counter()
    rc = cfg.ranking
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = tables.spec
    heads = rc.resolve_heads(list(spec["binary_signals"]), spec.get("watch_time_signal"))
    L.seed_everything(cfg.seed, workers=False, verbose=False)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")  # shards are disjoint
    data = _Data(cfg, tables, heads, refit=refit is not None)

    task, train_info = _fit_main(cfg, data, heads, out_dir, resume, progress, refit.epochs if refit else None)
    if "global_rank" in train_info:  # another rank of a distributed fit: rank 0 does the rest
        return {}
    # The GBDT: the baseline, and the hybrid ranker's second component (refit: the blended heads only).
    gbdt = None
    if refit is None and (rc.gbdt_baseline or rc.hybrid):
        gbdt = _fit_gbdt(cfg, data, heads)
    elif refit is not None and rc.hybrid and refit.gbdt_rounds:
        gbdt = _fit_gbdt(cfg, data, heads, rounds=refit.gbdt_rounds)
    scorer, logits_valid, blends = _scorer(task, heads, data, list(range(len(heads))),
                                           refit.calibration if refit else None, gbdt if rc.hybrid else None, cfg.seed,
                                           rc.hybrid_min_gain, rc.hybrid_min_positives)
    trees = _blended(scorer, gbdt) if rc.hybrid else None
    parity = _export(scorer, data, out_dir / RANKER_ONNX, cfg.seed, trees=trees)
    # The serving graph: the same model with one request's shared columns computed once (RequestScorer),
    # checked against the full scorer on request-shaped inputs.
    const_cat, const_num = data.layout.request_constant()
    request_parity = _export(scorer, data, out_dir / RANKER_REQUEST_ONNX, cfg.seed + 1,
                             RequestScorer(scorer, const_cat, const_num).eval(),
                             lambda make: request_shaped(make, const_cat, const_num), trees=trees)
    for what, report in (("ranker", parity), ("request ranker", request_parity)):
        if not report.ok(rc.parity_tolerance):
            raise RuntimeError(f"ONNX parity of the {what} failed: {report.describe()} > {rc.parity_tolerance:.0e}")

    single_files: dict[str, str] = {}
    single_parity: dict[str, float] = {}
    single_valid: dict[str, np.ndarray] = {}
    t_single = time.perf_counter()
    if rc.single_task_baselines and refit is None:  # baselines exist to be compared on the test period
        for t, (name, _) in enumerate(heads):
            L.seed_everything(cfg.seed, workers=False, verbose=False)
            st = _fit_single(cfg, data, heads, t, progress)
            rel = f"single_task/{name}.onnx"
            st_scorer, st_logits, _ = _scorer(st, [heads[t]], data, [t])
            single_valid[name] = st_logits[:, 0]
            single_parity[name] = _export(st_scorer, data, out_dir / rel, cfg.seed).max_scaled_diff
            single_files[name] = rel
            log.info("single-task %s: %.1fs", name, time.perf_counter() - t_single)
    single_seconds = time.perf_counter() - t_single

    spec = RankingSpec(
        format_version=RANKING_FORMAT_VERSION,
        onnx=RANKER_ONNX,
        # Serving scores one request's candidates with this graph (identical results, user side once).
        request_onnx=RANKER_REQUEST_ONNX,
        opset=OPSET,
        inputs=_inputs(data),
        outputs=(ScoresOutput("scores", "float32", ["batch", len(heads)], [n for n, _ in heads],
                              "sigmoid per head; watch_time = watch quantile"),
                 WatchTimeOutput("watch_time_s", "float32", ["batch"], "s") if data.wtq else None),
        heads=[Head(n, k, i, rc.loss_weights.get(n, 1.0),
                    int(data.train_positives[n]) if k == "binary" else None)
               for i, (n, k) in enumerate(heads)],
        scenarios=rc.scenarios,
        other={
            "request_constant": {"cat": const_cat, "num": const_num},
            "request_parity_max_scaled_diff": request_parity.max_scaled_diff,
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
                       "gbdt_files": save_boosters(trees, out_dir) if trees else {},
                       "gbdt_features": trees.feature_names if trees else [],
                       "heads": {h: b.to_json() for h, b in blends.items()}},
            "single_task": single_files,
            "single_task_parity_max_scaled_diff": single_parity,
            "training": train_info,
        },
    )
    if refit is not None:
        spec.other["refit"] = {"epochs": refit.epochs, "rows": data.train_rows,
                               "held_out_metrics": {h: {k: m.get(k) for k in ("auc", "gauc", "logloss")}
                                                    for h, m in refit.held_out.get("model", {}).items()}}
    meta = _jsonable(spec.to_json())
    (out_dir / RANKING_JSON).write_text(json.dumps(meta, indent=1))
    if refit is not None:
        report = _jsonable({"training": train_info, "parity_max_scaled_diff": parity.max_scaled_diff,
                            "wall_seconds": round(time.perf_counter() - t_start, 1)})
        _log_mlflow(report, out_dir, [out_dir / f for f in (RANKING_JSON, RANKER_ONNX, RANKER_REQUEST_ONNX)],
                    "refit/ranking")
        return report

    # Test-period evaluation through ONNX Runtime: what is measured is what ships.
    t_eval = time.perf_counter()
    model_out, single_out = score_bundle(out_dir, meta, data.inputs["test"])
    test = data.rows["test"]
    report = build_report(test, heads, data.wtq, rc.scenarios, model_out, single_out or None, rc.ece_bins,
                          rc.fusion_k, cfg.seed, _baseline_scores(task, heads, data, gbdt, logits_valid, trees),
                          rc.rare_head_positives,
                          rc.bootstrap_samples)
    yv = data.labels["valid"]
    report["validation"] = {"model": _valid_aucs(heads, yv, {n: logits_valid[:, t] for t, (n, _) in enumerate(heads)})}
    if single_valid:
        report["validation"]["single_task"] = _valid_aucs(heads, yv, single_valid)
    if gbdt:
        report["validation"]["gbdt"] = _valid_aucs(heads, yv, gbdt.scores("valid"))
    if blends:
        report["hybrid"] = {h: b.to_json() for h, b in blends.items()}
    gbdt_info = ({"gbdt": {"fit_seconds": gbdt.fit_seconds, "samples_per_s": gbdt.samples_per_s,
                           "rounds": gbdt.rounds, "features": len(gbdt.feature_names)}} if gbdt else {})
    report["training"] = {**train_info, **gbdt_info, "single_task_seconds": round(single_seconds, 1),
                          "eval_seconds": round(time.perf_counter() - t_eval, 1),
                          "wall_seconds": round(time.perf_counter() - t_start, 1)}
    report["parity_max_abs_diff"] = parity.max_abs_diff
    report["parity_max_scaled_diff"] = parity.max_scaled_diff
    report = _jsonable(report)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=1))
    table = _per_head_table(report)
    table.to_csv(out_dir / "per_head.csv", index=False)
    (out_dir / "per_head.md").write_text(_markdown(table))
    reliability_plot(test, heads, model_out[0], out_dir / "reliability.png", rc.ece_bins)
    files = [out_dir / f for f in (RANKING_JSON, "metrics.json", "per_head.csv", "per_head.md", "reliability.png",
                                   RANKER_ONNX, RANKER_REQUEST_ONNX)]
    files += [out_dir / f for f in single_files.values()]
    _log_mlflow({k: v for k, v in report.items() if k != "training"} | {"training": {**train_info, **gbdt_info}},
                out_dir, files)
    return report
