"""The retrieval stage: train the two towers, evaluate on the test period against popularity baselines,
export both towers to ONNX, embed the whole catalogue and build the FAISS index.

Periods: the model trains on ``train`` and selects its checkpoint / stops early on ``valid`` (Recall@K with
the test protocol, "training" = the train period). The test evaluation treats everything before the test
period (train + valid) as training data: candidates, users, exclusions and the baselines' counts come
from it, and the towers see features as of the test period's start (quality aggregates and history).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from features.contract import RETRIEVAL_JSON, USER_TOWER_ONNX
from features.tables import FeatureTables
from training.batches import TensorBatches
from training.config import TrainConfig
from training.refit import RefitPlan
from training.retrieval.baselines import baseline_scorers
from training.retrieval.channels import channel_recall
from training.retrieval.config import RetrievalConfig
from training.retrieval.data import InputLayout, ItemFeatures
from training.retrieval.metrics import EvalSet, evaluate_all, make_eval_set, plot_curves
from training.retrieval.model import ItemEmbeddings, ItemTower, TwoTower, UserTower
from training.retrieval.log import load_log, period_rows
from training.retrieval.rows import item_num_stats, positive_counts, positive_stream, positive_tensors, user_rows
from training.retrieval.ship import onnx_vectors, retrieval_meta, ship
from training.retrieval.task import PriorChoice, RetrievalTask, Throughput, ValInputs, tower_vectors
from training.retrieval.served_dims import log_priors, mf_fit, with_prior
from training.retrieval.vectors import choose_mf_weight, with_mf
from training.stream import stream_callbacks
from training.tracking import active_run_logger, log_to_run, metric_key, metric_tree
from training.trainer import batch_sampler, checkpoint_dir, make_trainer

METRICS = "metrics.json"

log = logging.getLogger(__name__)


def load_interactions(tables: FeatureTables) -> pd.DataFrame:
    """The whole interaction table with the static columns joined (tests and tools; the stage reads only
    what each step needs, :mod:`training.retrieval.rows`)."""
    rows = pd.read_parquet(tables.dir / tables.manifest["tables"]["interactions"]["file"])
    rows["period"] = rows["period"].astype(str)
    return tables.join_static(rows)


def build_model(
    layout: InputLayout, feats: ItemFeatures, rc: RetrievalConfig, num_mean: np.ndarray, num_std: np.ndarray
) -> TwoTower:
    sizes = dict(zip(layout.item_cat, layout.item_cat_sizes))
    emb = ItemEmbeddings(sizes["item_id_idx"], sizes["creator_id_idx"], sizes["category_idx"], rc.id_dim, rc.feature_dim)
    user = UserTower(
        layout.user_cat_sizes, emb, torch.from_numpy(feats.item_creator), torch.from_numpy(feats.item_category),
        layout.history_length, rc.id_dim, rc.feature_dim, list(rc.hidden), rc.embedding_dim, rc.dropout,
        rc.history_encoder_layers, rc.history_encoder_heads,
    )
    item = ItemTower(
        emb, layout.item_cat_sizes[3:], torch.from_numpy(num_mean), torch.from_numpy(num_std),
        rc.id_dim, rc.feature_dim, list(rc.hidden), rc.embedding_dim, rc.dropout,
    )
    return TwoTower(user, item)


def _eval_users(tables: FeatureTables, layout: InputLayout, es: EvalSet, period: pd.DataFrame) -> pd.DataFrame:
    """The user-tower columns of each evaluated user's first row of ``period`` (EvalSet user order)."""
    return user_rows(tables, layout, period.index.to_numpy()[es.first_row])


def _val_inputs(es: EvalSet, users: pd.DataFrame, layout: InputLayout, feats: ItemFeatures, block: int,
                priors: dict[float, np.ndarray] | None = None) -> ValInputs:
    ua = layout.user_arrays(users)
    return ValInputs(
        es,
        torch.from_numpy(ua["user_cat"]),
        torch.from_numpy(ua["history"]),
        torch.from_numpy(feats.cat[es.candidates]),
        torch.from_numpy(np.ascontiguousarray(feats.num[block, es.candidates])),
        None if priors is None else {d: p[es.candidates] for d, p in priors.items()},
    )


def _by_user(es: EvalSet) -> EvalSet:
    """``es`` with ``first_row`` = the user's position: for a frame of one row per user (:func:`_eval_users`)."""
    return replace(es, first_row=np.arange(es.n_users))


def _history_callback():
    class History(L.Callback):
        def __init__(self):
            self.rows: list[dict[str, float]] = []

        def on_train_epoch_end(self, trainer, pl_module):  # after this epoch's validation
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("retrieval/val_")}
            self.rows.append({"epoch": trainer.current_epoch, **m})

    return History()


def _refit_queries(tables: FeatureTables, rows: pd.DataFrame, layout: InputLayout, n: int,
                   seed: int) -> dict[str, np.ndarray]:
    """User-tower inputs of up to ``n`` users at their latest row: the refit's index-recall queries."""
    last = pd.Series(rows.index[~rows["user_id"].duplicated(keep="last").to_numpy()])
    last = last.sample(min(n, len(last)), random_state=seed)
    return layout.user_arrays(user_rows(tables, layout, last.to_numpy()))


@dataclass
class _Periods:
    """The interactions split by period (the compact log of :func:`load_log`), with the tower inputs' layout
    and the catalogue's features."""

    layout: InputLayout
    rows: pd.DataFrame
    feats: ItemFeatures
    split: dict[str, Any]
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    valid_block: int
    test_block: int

    @classmethod
    def load(cls, cfg: TrainConfig, tables: FeatureTables) -> "_Periods":
        layout = InputLayout.from_tables(tables)
        rows = load_log(cfg, tables)
        feats = ItemFeatures(cfg, tables, layout, rows)
        split = tables.manifest["split"]
        starts = list(split["block_starts"])
        train, valid, test = (period_rows(rows, p) for p in ("train", "valid", "test"))
        return cls(layout, rows, feats, split, train, valid, test, starts.index(split["valid_start"]),
                   starts.index(split["test_start"]))


@dataclass
class _Trained:
    task: RetrievalTask
    trainer: L.Trainer
    best_path: Path
    throughput: Throughput
    history: Any
    positives: int
    weight: float
    num_mean: np.ndarray
    num_std: np.ndarray
    val: ValInputs | None
    val_es: EvalSet | None
    val_users: pd.DataFrame | None
    resumed_from: int | None
    seconds: float


def _train(cfg: TrainConfig, tables: FeatureTables, p: _Periods, out_dir: Path, resume: bool, progress: bool,
           refit: RefitPlan | None, seed: int) -> _Trained:
    """Sampled softmax on the train period's positives; early stopping on validation Recall@K (none in a refit)."""
    rc = cfg.retrieval
    ckpt_dir, last = checkpoint_dir(out_dir, resume, cfg.trainer)
    t_start = time.perf_counter()
    signal, layout, feats = rc.positive_signal, p.layout, p.feats
    counts = positive_counts(cfg, feats, p.train)
    if counts.examples == 0:
        raise ValueError(f"no training positives: no train-period row has {signal} > 0")
    if cfg.training.stream:  # the examples stay on disk: a shuffle buffer of them at a time
        stream = positive_stream(cfg, tables, layout, feats, "train", counts.examples, seed, cfg.trainer)
        train_dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.training.stream_workers)
    else:
        tt = positive_tensors(cfg, tables, layout, feats, "train")
        sampler = batch_sampler(len(tt), rc.batch_size, True, seed, cfg.trainer)
        train_dl = torch.utils.data.DataLoader(TensorBatches(vars(tt)), sampler=sampler, batch_size=None)
    num_mean, num_std = item_num_stats(tables, layout, p.train)

    val_es = make_eval_set(p.train, p.valid, feats.item_ids, signal) if refit is None else None
    if val_es is not None and val_es.n_users == 0:
        raise ValueError(f"the validation period has no user with a {signal} positive on a train item: "
                         "early stopping needs one; widen split.valid_* ")
    val, val_users = None, None
    if val_es is not None:
        val_priors = log_priors(rc, p.train, feats.item_ids, int(p.split["valid_start"]), rc.prior_day_grid)
        val_users = _eval_users(tables, layout, val_es, p.valid)
        val = _val_inputs(val_es, val_users, layout, feats, p.valid_block, val_priors)
    model = build_model(layout, feats, rc, num_mean, num_std)
    task = RetrievalTask(
        model, rc, torch.tensor(feats.cat), torch.from_numpy(feats.num), torch.from_numpy(counts.freq),
        torch.from_numpy(feats.vocab_rows.astype(np.int64)), val,
    )
    val_dl = torch.utils.data.DataLoader([0], batch_size=1)

    throughput, history = Throughput(), _history_callback()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=None if refit else task.val_metric,
                                 mode="max", save_last=True, save_top_k=0 if refit else 1)
    stop = [] if refit else [EarlyStopping(task.val_metric, mode="max", patience=rc.patience)]
    logger = active_run_logger()
    trainer = make_trainer(
        cfg.trainer, max_epochs=refit.epochs if refit else rc.max_epochs,
        min_epochs=refit.epochs if refit else rc.min_epochs,
        callbacks=[checkpoint, *stop, throughput, history, *stream_callbacks(train_dl)],
        logger=logger if logger is not None else False, progress=progress, validate=refit is None,
        default_root_dir=out_dir,
    )
    resumed_from = None
    ckpt_path = None
    if resume and last.exists():
        ckpt_path = str(last)
        resumed_from = int(torch.load(last, map_location="cpu", weights_only=False)["epoch"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
        # training.stream: each worker reads its own stripe, so the stream's length is exact
        warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
        trainer.fit(task, train_dataloaders=train_dl, val_dataloaders=None if refit else val_dl, ckpt_path=ckpt_path)
    best_path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else ckpt_dir / "best.ckpt"
    return _Trained(task, trainer, best_path, throughput, history, counts.examples, counts.weight, num_mean,
                    num_std, val, val_es, val_users, resumed_from, time.perf_counter() - t_start)


@dataclass
class _Evaluated:
    metrics: dict[str, Any]  # test period: the model, the baselines and the channels
    valid: dict[str, Any]  # validation: what was chosen there and the sweeps
    test_queries: np.ndarray  # the test users' served query vectors (the index's recall queries)
    prior: PriorChoice
    mf_weight: float
    quotas: dict[str, int]
    window: int
    tuning: dict[str, Any]


def _evaluate(rc: RetrievalConfig, tables: FeatureTables, p: _Periods, model: TwoTower, t: _Trained, seed: int,
              out_dir: Path) -> _Evaluated:
    """Validation chooses the prior's beta, the MF weight, the baselines' settings and the channel quotas
    with the selected checkpoint; the test period then measures all of them, each against the baselines."""
    signal, layout, feats, split = rc.positive_signal, p.layout, p.feats, p.split
    val, val_es = t.val, t.val_es
    assert val is not None and val_es is not None
    kw = dict(recall_ks=list(rc.eval_ks), ndcg_ks=list(rc.ndcg_ks))
    uv_val, iv_val = tower_vectors(model, val)
    monitor_first = [rc.monitor_k] + [k for k in rc.eval_ks if k != rc.monitor_k]
    seen = p.rows[p.rows["period"] != "test"]
    test_es = make_eval_set(seen, p.test, feats.item_ids, signal)
    val_base, test_base, tuning = baseline_scorers(rc, p.train, p.valid, seen, feats.item_ids, val_es, test_es, split, seed)
    mf_val, prior, sweep, mf_sweep = choose_mf_weight(rc, tuning, p.train, feats, tables, layout, val, val_es, uv_val,
                                                      iv_val, monitor_first, seed)
    mf_weight = mf_val.weight if mf_val is not None else 0.0
    assert val.priors is not None
    val_vectors = with_prior(*with_mf(uv_val, iv_val, mf_val, val.user_cat, val_es.candidates), prior.beta,
                             val.priors[prior.days])
    val_metrics, _ = evaluate_all(val_es, *val_vectors, val_base, **kw)
    one_window = len(rc.prior_day_grid) == 1
    val_metrics["prior_sweep"] = {c.key(one_window): m for c, m in sweep.items()}
    val_metrics["prior"] = {"days": prior.days, "beta": prior.beta}
    val_metrics["baseline_sweep"] = tuning
    if mf_sweep:
        val_metrics["mf_weight_sweep"] = mf_sweep
    test_users = _eval_users(tables, layout, test_es, p.test)
    alone = mf_sweep.get("0.0", {"beta": prior.beta, "prior_days": prior.days})  # the towers' own best prior
    windows = list(dict.fromkeys([prior.days, float(alone["prior_days"])]))
    test_in = _val_inputs(test_es, test_users, layout, feats, p.test_block,
                          log_priors(rc, seen, feats.item_ids, int(split["test_start"]), windows))
    assert test_in.priors is not None
    uv_tt, iv_tt = tower_vectors(model, test_in)
    mf_test = (mf_fit(rc, seen, feats.item_ids, tables, layout.user_cat_sizes[0], tuning["mf"]["params"], mf_weight, seed)
               if mf_weight > 0 else None)
    uv, iv = with_prior(*with_mf(uv_tt, iv_tt, mf_test, test_in.user_cat, test_es.candidates), prior.beta,
                        test_in.priors[prior.days])
    if mf_test is not None:  # what the MF dimensions add: the towers alone, with their own best prior
        uv0, iv0 = with_prior(uv_tt, iv_tt, float(alone["beta"]), test_in.priors[float(alone["prior_days"])])
        test_base["two_tower_alone"] = lambda u: uv0[u] @ iv0.T
    metrics, curves = evaluate_all(test_es, uv, iv, test_base, **kw)
    window = int(tuning.get("covisit", {}).get("params", {}).get("window", 10))
    mf_dims = slice(rc.embedding_dim, rc.embedding_dim + mf_val.items.shape[1]) if mf_val is not None else None
    # channel_recall reads each user's history at period.iloc[es.first_row]: hand it the users' rows.
    val_ch = channel_recall(rc, p.train, t.val_users, _by_user(val_es), layout, feats, tables, window,
                            int(split["valid_start"]), lambda u: val_vectors[0][u] @ val_vectors[1].T, None,
                            _mf_scores(val_vectors, mf_dims))
    quotas = max(val_ch["merged"], key=lambda r: r[f"recall@{rc.channel_total}"])["quotas"]
    test_ch = channel_recall(rc, seen, test_users, _by_user(test_es), layout, feats, tables, window,
                             int(split["test_start"]), lambda u: uv[u] @ iv.T, [quotas], _mf_scores((uv, iv), mf_dims))
    metrics["channels"] = {"quotas": quotas, "k": rc.channel_total, "single": test_ch["single"],
                           "merged": test_ch["merged"][0][f"recall@{rc.channel_total}"],
                           "merged_vs_best_single": test_ch.get("vs_best_single")}
    val_metrics["channel_sweep"] = val_ch
    plot_curves(curves, out_dir / "recall_vs_k.png", f"test period: Recall@K ({metrics['test_users']} users)")
    return _Evaluated(metrics, val_metrics, uv, prior, mf_weight, quotas, window, tuning)


def _mf_scores(vectors: tuple[np.ndarray, np.ndarray], dims: slice | None):
    """The MF channel's scores from the served vectors' MF dimensions (None without them)."""
    if dims is None:
        return None
    u, i = vectors[0][:, dims], np.ascontiguousarray(vectors[1][:, dims])
    return lambda users: u[users] @ i.T


def fit_retrieval(
    cfg: TrainConfig, tables: FeatureTables, out_dir: Path, resume: bool = False, progress: bool = True,
    refit: RefitPlan | None = None,
) -> dict:
    """Train, evaluate on the test period, export, index. With ``refit``: train every row for the plan's
    epochs (no validation), export and index with the held-out fit's prior weight, channel quotas and
    baseline settings; the metrics returned are what the refit did."""
    rc = cfg.retrieval
    rc.validate(cfg.data.binary_signals)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed if rc.seed is None else rc.seed
    L.seed_everything(seed, workers=True, verbose=False)
    if rc.num_threads > 0:
        torch.set_num_threads(rc.num_threads)
    p = _Periods.load(cfg, tables)
    t = _train(cfg, tables, p, out_dir, resume, progress, refit, seed)
    trainer = t.trainer
    if not trainer.is_global_zero:  # another rank of a distributed fit: rank 0 evaluates, exports, indexes
        return {}
    if refit is not None:
        return _refit_outputs(rc, tables, out_dir, t.task.model.cpu().eval(), p.layout, p.feats, p.rows, refit,
                              t.num_mean, t.num_std, seed, t.throughput, t.positives, t.seconds)
    best = torch.load(t.best_path, map_location="cpu", weights_only=False)
    t.task.load_state_dict(best["state_dict"], strict=False)
    model = t.task.model.cpu().eval()
    ev = _evaluate(rc, tables, p, model, t, seed, out_dir)

    # ---- export, catalogue vectors, channels, index
    tuning = ev.tuning
    mf_ship = (mf_fit(rc, p.rows, p.feats.item_ids, tables, p.layout.user_cat_sizes[0], tuning["mf"]["params"], ev.mf_weight,
                      seed) if ev.mf_weight > 0 else None)
    shipped = ship(rc, out_dir, model, ev.prior, p.layout, p.feats, tables, p.rows, t.num_mean, t.num_std, seed,
                   ev.window, lambda: ev.test_queries, "test-period users' query vectors", mf_ship)
    training = {
        "epochs": int(trainer.current_epoch),
        "best_epoch": int(best["epoch"]),
        "stopped_early": bool(trainer.current_epoch < rc.max_epochs),
        "resumed_from_epoch": t.resumed_from,
        "epochs_run_now": len(t.throughput.epochs),
        "train_positives": t.positives,
        "train_weight": round(t.weight, 1),
        "samples_per_s": round(t.throughput.samples_per_s, 1),  # rank 0's share in a distributed fit
        "world_size": trainer.world_size,
        "wall_seconds": round(t.seconds, 1),
        "val_history": t.history.rows,
    }
    baselines = {n: x["params"] for n, x in tuning.items()}
    metrics = {**ev.metrics, "valid": ev.valid, "training": training,
               "protocol": {"signal": rc.positive_signal, "seen_periods": ["train", "valid"],
                            "evaluated_period": "test", "recent_days": rc.recent_days, "prior_beta": ev.prior.beta,
                            "prior_days": ev.prior.days,
                            "mf_weight": ev.mf_weight, "baselines": baselines}}
    (out_dir / METRICS).write_text(json.dumps(metrics, indent=2))
    if t.history.rows:
        _plot_history(t.history.rows, out_dir / "val_recall_by_epoch.png", t.task.val_metric)
    meta = retrieval_meta(rc, shipped, ev.prior, ev.quotas, ev.window, baselines,
                          {k: v for k, v in training.items() if k != "val_history"}, metrics)
    (out_dir / RETRIEVAL_JSON).write_text(json.dumps(meta, indent=2))
    _log_mlflow(out_dir, metrics, shipped.index, shipped.parity)
    return metrics


def _refit_outputs(rc: RetrievalConfig, tables: FeatureTables, out_dir: Path, model: TwoTower, layout: InputLayout,
                   feats: ItemFeatures, rows: pd.DataFrame, refit: RefitPlan, num_mean: np.ndarray,
                   num_std: np.ndarray, seed: int, throughput: Throughput, positives: int,
                   train_seconds: float) -> dict:
    """The refit ships with the held-out fit's prior weight, channel quotas and baseline settings;
    ``retrieval.json`` carries the held-out metrics."""
    held = refit.held_out
    protocol = held.get("protocol", {})
    # a held-out fit from before the window was chosen counted the prior over the config's one window
    prior = PriorChoice(float(protocol.get("prior_days", rc.prior_day_grid[0])), float(protocol.get("prior_beta", 0.0)))
    baselines = protocol.get("baselines", {})
    window = int(baselines.get("covisit", {}).get("window", 10))
    quotas = held.get("channels", {}).get("quotas", {"ann": rc.channel_total})
    mf_weight = float(protocol.get("mf_weight", 0.0))
    mf = (mf_fit(rc, rows, feats.item_ids, tables, layout.user_cat_sizes[0], baselines["mf"], mf_weight, seed)
          if mf_weight > 0 else None)
    # The index's recall is measured on the exported user tower's vectors of users' latest rows.
    shipped = ship(rc, out_dir, model, prior, layout, feats, tables, rows, num_mean, num_std, seed, window,
                    lambda: onnx_vectors(out_dir / USER_TOWER_ONNX, _refit_queries(tables, rows, layout, 2000, seed)),
                    "refit: users' latest training rows", mf)
    training = {"epochs": refit.epochs, "train_positives": positives,
                "samples_per_s": round(throughput.samples_per_s, 1), "wall_seconds": round(train_seconds, 1)}
    meta = retrieval_meta(rc, shipped, prior, quotas, window, baselines, training, held)
    meta["refit"] = {"epochs": refit.epochs, "rows": len(rows)}
    (out_dir / RETRIEVAL_JSON).write_text(json.dumps(meta, indent=2))
    report = {"training": training, "index_recall_vs_exact": shipped.index.recall_vs_exact,
              "parity_max_abs_diff": max(shipped.parity.values()), "prior_beta": prior.beta,
              "prior_days": prior.days, "mf_weight": mf_weight}
    log_to_run({"refit/retrieval/samples_per_s": training["samples_per_s"],
                "refit/retrieval/index_recall_vs_exact": shipped.index.recall_vs_exact},
               [out_dir / RETRIEVAL_JSON], "refit/retrieval")
    return report


def _plot_history(rows: list[dict], path: Path, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epoch"] for r in rows], [r.get(key, np.nan) for r in rows], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_mlflow(out_dir: Path, metrics: dict, index, parity: dict) -> None:
    flat = metric_tree(metrics["model"], "retrieval/test/model")
    for b, vals in metrics["baselines"].items():
        flat.update(metric_tree(vals, metric_key("retrieval/test", b)))
    ch = metrics.get("channels")
    if ch:
        for name, v in ch["single"].items():
            flat[f"retrieval/test/channel_{name}/recall_at_{ch['k']}"] = v
        flat[f"retrieval/test/channels_merged/recall_at_{ch['k']}"] = ch["merged"]
        if ch.get("merged_vs_best_single"):
            flat["retrieval/test/channels_merged/minus_best_single"] = ch["merged_vs_best_single"]["difference"]
    flat["retrieval/test_users"] = metrics["test_users"]
    flat["retrieval/index_recall_vs_exact"] = index.recall_vs_exact
    flat["retrieval/parity_max_abs_diff"] = max(parity.values())
    flat["retrieval/samples_per_s_mean"] = metrics["training"]["samples_per_s"]
    tags = {"retrieval.train_positives": metrics["training"]["train_positives"],
            "retrieval.best_epoch": metrics["training"]["best_epoch"],
            "retrieval.candidates": metrics.get("candidates", 0)}
    log_to_run(flat, sorted(out_dir.iterdir()), "retrieval", tags)
