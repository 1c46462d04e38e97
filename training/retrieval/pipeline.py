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
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from features.contract import (CHANNELS, FAISS_INDEX, ITEM_TOWER_ONNX, ITEM_VECTORS, MF_USER_FACTORS,
                               RETRIEVAL_FORMAT_VERSION, RETRIEVAL_JSON, USER_TOWER_ONNX, Channels, Covisit, IndexSpec,
                               ItemVectors, MatrixFactors, Prior, RetrievalFiles, RetrievalSpec, Tower)
from features.split import DAY_MS
from features.tables import FeatureTables
from training.config import TrainConfig
from training.onnx_export import OPSET, check_parity, export_onnx, session
from training.retrieval.config import RetrievalConfig
from training.retrieval.data import BatchDataset, InputLayout, ItemFeatures, train_tensors
from training.retrieval.index import build_and_measure
from training.retrieval.baselines import als_factors, make_scorer, tune_baselines, tuned_json
from training.retrieval.channels import build_tables, merged_recall, quota_grid
from training.retrieval.metrics import (EvalSet, evaluate_all, make_eval_set, plot_curves, popularity_scores,
                                        weighted_counts)
from training.retrieval.model import ItemEmbeddings, ItemTower, PriorUserTower, TwoTower, UserTower
from training.retrieval.task import RetrievalTask, Throughput, ValInputs, prior_sweep, tower_vectors
from training.refit import RefitPlan
from training.trainer import batch_sampler, is_global_zero, make_trainer

PARITY_TOL = 1e-4
METRICS = "metrics.json"

log = logging.getLogger(__name__)


def load_interactions(tables: FeatureTables) -> pd.DataFrame:
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
    )
    item = ItemTower(
        emb, layout.item_cat_sizes[3:], torch.from_numpy(num_mean), torch.from_numpy(num_std),
        rc.id_dim, rc.feature_dim, list(rc.hidden), rc.embedding_dim, rc.dropout,
    )
    return TwoTower(user, item)


def _val_inputs(es: EvalSet, rows: pd.DataFrame, layout: InputLayout, feats: ItemFeatures, block: int,
                prior: np.ndarray | None = None) -> ValInputs:
    ua = layout.user_arrays(rows.iloc[es.first_row])
    return ValInputs(
        es,
        torch.from_numpy(ua["user_cat"]),
        torch.from_numpy(ua["history"]),
        torch.from_numpy(feats.cat[es.candidates]),
        torch.from_numpy(np.ascontiguousarray(feats.num[block, es.candidates])),
        None if prior is None else prior[es.candidates],
    )


def log_prior(rc: RetrievalConfig, seen: pd.DataFrame, item_ids: np.ndarray, end_ts: int) -> np.ndarray:
    """(catalogue,) log(1 + training weight of the item's rows), over the last ``prior_days`` before
    ``end_ts`` (all seen rows when 0): the popularity the logQ correction took out of u.v."""
    from_ts = int(end_ts - rc.prior_days * DAY_MS) if rc.prior_days > 0 else None
    return np.log1p(weighted_counts(seen, item_ids, rc.row_weights(seen), from_ts)).astype(np.float32)


def _with_prior(uv: np.ndarray, iv: np.ndarray, beta: float, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[u, beta] and [v, prior]: the folded vectors whose inner product is u.v + beta * prior."""
    return (np.hstack([uv, np.full((len(uv), 1), beta, np.float32)]),
            np.hstack([iv, prior.reshape(-1, 1).astype(np.float32)]))


@dataclass
class _MF:
    """The MF dimensions of the served vectors: ``table`` (user vocabulary, f) = weight x ALS user factors by
    ``user_id_idx`` (row 0, the unknown user, and users ALS never saw are 0), ``items`` (catalogue, f)."""

    weight: float
    table: np.ndarray
    items: np.ndarray


def _mf_fit(rc: RetrievalConfig, seen: pd.DataFrame, feats: ItemFeatures, tables: FeatureTables, vocab_size: int,
            params: dict, weight: float, seed: int) -> _MF:
    users, uf, itf = als_factors(seen, feats.item_ids, rc.positive_signal, int(params["factors"]),
                                 params["regularization"], params["alpha"], params["impression_weight"],
                                 rc.baselines.als_iterations, seed)
    pos = users.get_indexer(tables.users["user_id"].astype(str))
    idx = tables.users["user_id_idx"].to_numpy(np.int64)
    ok = (pos >= 0) & (idx > 0)
    table = np.zeros((vocab_size, uf.shape[1]), np.float32)
    table[idx[ok]] = uf[pos[ok]] * np.float32(weight)
    return _MF(float(weight), table, itf)


def _with_mf(uv: np.ndarray, iv: np.ndarray, mf: _MF | None, user_cat: torch.Tensor,
             candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tower vectors with the MF dimensions appended, as the exported user tower and item vectors lay them out."""
    if mf is None:
        return uv, iv
    return (np.hstack([uv, mf.table[user_cat[:, 0].numpy()]]).astype(np.float32),
            np.hstack([iv, mf.items[candidates]]).astype(np.float32))


def _mf_sweep(rc: RetrievalConfig, tuning: dict, train: pd.DataFrame, feats: ItemFeatures, tables: FeatureTables,
              layout: InputLayout, val: ValInputs, es: EvalSet, uv: np.ndarray, iv: np.ndarray, ks: list[int],
              seed: int) -> tuple[_MF | None, float, dict, dict]:
    """(the MF dimensions at the chosen weight, None for weight 0; prior beta; the prior sweep at that
    weight; recall@k by weight): chosen together on validation, MF fitted on the train period with the
    tuned baseline's settings."""
    key = f"recall@{ks[0]}"
    weights = sorted(set(rc.mf_weights)) if "mf" in tuning else [0.0]
    if weights == [0.0]:
        beta, sweep = prior_sweep(es, uv, iv, val.prior, list(rc.prior_betas), ks, [])
        return None, beta, sweep, {}
    unit = _mf_fit(rc, train, feats, tables, layout.user_cat_sizes[0], tuning["mf"]["params"], 1.0, seed)
    best, by_weight = None, {}
    for w in weights:
        mf = _MF(w, unit.table * np.float32(w), unit.items) if w > 0 else None
        beta, sweep = prior_sweep(es, *_with_mf(uv, iv, mf, val.user_cat, es.candidates), val.prior,
                                  list(rc.prior_betas), ks, [])
        by_weight[str(w)] = {"beta": beta, key: sweep[beta][key]}
        log.info("MF weight %s: beta %s, valid %s %.4f", w, beta, key, sweep[beta][key])
        if best is None or sweep[beta][key] > best[2][best[1]][key]:
            best = (mf, beta, sweep)
    assert best is not None
    return best[0], best[1], best[2], by_weight


def _channels(rc: RetrievalConfig, seen: pd.DataFrame, period: pd.DataFrame, es: EvalSet, layout: InputLayout,
              feats: ItemFeatures, tables: FeatureTables, window: int, start: int, score_chunk,
              grid: list[dict[str, int]] | None) -> dict:
    """Recall@channel_total of each channel and of the quota mixes, tables built from ``seen`` only."""
    ch = build_tables(seen, tables.items, np.zeros(0, str), rc.positive_signal, window, rc.covisit_top,
                      rc.recent_days, start)
    hist = layout.user_arrays(period.iloc[es.first_row])["history"]
    grid = grid or quota_grid(rc.channel_total, rc.channel_covisit, rc.channel_trending, rc.channel_fresh)
    return merged_recall(es, score_chunk, hist, _idx_to_row(tables), ch, len(feats.item_ids), grid)


def _idx_to_row(tables: FeatureTables) -> np.ndarray:
    idx = tables.items["item_id_idx"].to_numpy(np.int64)
    out = np.full(int(idx.max(initial=0)) + 1, -1, np.int64)
    out[idx[idx > 0]] = np.flatnonzero(idx > 0)
    return out


def _baselines(rc: RetrievalConfig, train: pd.DataFrame, valid: pd.DataFrame, seen: pd.DataFrame,
               item_ids: np.ndarray, val_es: EvalSet, test_es: EvalSet, split: dict, seed: int):
    """Popularity scores and the MF / co-visitation scorers tuned on validation, refit on ``seen`` for test;
    returns (validation scorers, test scorers, tuning record)."""
    signal = rc.positive_signal
    val = popularity_scores(train, item_ids, val_es, signal, int(split["valid_start"] - rc.recent_days * DAY_MS))
    test = popularity_scores(seen, item_ids, test_es, signal, int(split["test_start"] - rc.recent_days * DAY_MS))
    tuned = tune_baselines(rc.baselines, train, item_ids, val_es, signal, rc.monitor_k, seed)
    for name, t in tuned.items():
        val[name] = make_scorer(name, t.params, rc.baselines, train, item_ids, val_es, signal, seed)
        test[name] = make_scorer(name, t.params, rc.baselines, seen, item_ids, test_es, signal, seed)
    return val, test, tuned_json(tuned)


def _random_inputs(layout: InputLayout, num_mean: np.ndarray, num_std: np.ndarray, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def ints(sizes: list[int], b: int) -> torch.Tensor:
        return torch.stack([torch.randint(0, s, (b,), generator=gen) for s in sizes], dim=1)

    def user(b: int) -> dict[str, torch.Tensor]:
        hist = torch.randint(0, layout.item_cat_sizes[0], (b, layout.history_length), generator=gen)
        hist[torch.rand(hist.shape, generator=gen) < 0.5] = 0  # padding as in real histories
        return {"user_cat": ints(layout.user_cat_sizes, b), "history": hist}

    def item(b: int) -> dict[str, torch.Tensor]:
        noise = torch.randn(b, len(layout.item_num), generator=gen)
        num = torch.from_numpy(num_mean) + noise * torch.from_numpy(num_std)
        return {"item_cat": ints(layout.item_cat_sizes, b), "item_num": num.to(torch.float32)}

    return user, item


def onnx_vectors(path: Path, feeds: dict[str, np.ndarray], batch: int = 8192) -> np.ndarray:
    sess = session(path, threads=0)
    n = len(next(iter(feeds.values())))
    out = [sess.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


class _ActiveRunLogger:
    """Lightning's MLFlowLogger bound to the CLI's active run; it must not end that run when fit ends."""

    @staticmethod
    def make():
        import mlflow
        from lightning.pytorch.loggers import MLFlowLogger

        run = mlflow.active_run()
        if run is None:
            return None

        class Logger(MLFlowLogger):
            def finalize(self, status: str = "success") -> None:  # the CLI owns the run's lifecycle
                return None

        return Logger(run_id=run.info.run_id, tracking_uri=mlflow.get_tracking_uri())


def _history_callback():
    class History(L.Callback):
        def __init__(self):
            self.rows: list[dict[str, float]] = []

        def on_train_epoch_end(self, trainer, pl_module):  # after this epoch's validation
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("retrieval/val_")}
            self.rows.append({"epoch": trainer.current_epoch, **m})

    return History()


def _refit_queries(rows: pd.DataFrame, layout: InputLayout, n: int, seed: int) -> dict[str, np.ndarray]:
    """User-tower inputs of up to ``n`` users at their latest row: the refit's index-recall queries."""
    last = rows.drop_duplicates("user_id", keep="last")
    last = last.sample(min(n, len(last)), random_state=seed)
    return layout.user_arrays(last)


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
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if not resume and ckpt_dir.exists() and is_global_zero(cfg.trainer):
        shutil.rmtree(ckpt_dir)  # a fresh fit must not pick up or version against old checkpoints
    seed = cfg.seed if rc.seed is None else rc.seed
    L.seed_everything(seed, workers=True, verbose=False)
    if rc.num_threads > 0:
        torch.set_num_threads(rc.num_threads)
    t_start = time.perf_counter()

    signal = rc.positive_signal
    layout = InputLayout.from_tables(tables)
    rows = load_interactions(tables)
    feats = ItemFeatures(cfg, tables, layout, rows)
    split = tables.manifest["split"]
    starts = list(split["block_starts"])
    valid_block, test_block = starts.index(split["valid_start"]), starts.index(split["test_start"])
    train, valid, test = (rows[rows["period"] == p] for p in ("train", "valid", "test"))
    weight = rc.row_weights(train)
    positives = train[weight > 0]
    if positives.empty:
        raise ValueError(f"no training positives: no train-period row has {signal} > 0")
    tt = train_tensors(positives, layout, feats, weight[weight > 0])
    freq = np.bincount(tt.item_row.numpy(), minlength=len(feats.item_ids)) / len(tt)
    num = train[layout.item_num].to_numpy(np.float64)
    num_mean = np.nan_to_num(np.nanmean(num, axis=0)).astype(np.float32)
    num_std = np.nan_to_num(np.nanstd(num, axis=0)).astype(np.float32)
    num_std[num_std < 1e-6] = 1.0

    val_es = make_eval_set(train, valid, feats.item_ids, signal) if refit is None else None
    if val_es is not None and val_es.n_users == 0:
        raise ValueError(f"the validation period has no user with a {signal} positive on a train item: "
                         "early stopping needs one; widen split.valid_* ")
    val = None
    if val_es is not None:
        val_prior = log_prior(rc, train, feats.item_ids, int(split["valid_start"]))
        val = _val_inputs(val_es, valid, layout, feats, valid_block, val_prior)
    model = build_model(layout, feats, rc, num_mean, num_std)
    task = RetrievalTask(
        model, rc, torch.tensor(feats.cat), torch.from_numpy(feats.num), torch.from_numpy(freq),
        torch.from_numpy(feats.vocab_rows.astype(np.int64)), val,
    )
    sampler = batch_sampler(len(tt), rc.batch_size, True, seed, cfg.trainer)
    train_dl = torch.utils.data.DataLoader(BatchDataset(tt), sampler=sampler, batch_size=None)
    val_dl = torch.utils.data.DataLoader([0], batch_size=1)

    throughput, history = Throughput(), _history_callback()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=None if refit else task.val_metric,
                                 mode="max", save_last=True, save_top_k=0 if refit else 1)
    stop = [] if refit else [EarlyStopping(task.val_metric, mode="max", patience=rc.patience)]
    callbacks = [checkpoint, *stop, throughput, history]
    logger = _ActiveRunLogger.make()
    trainer = make_trainer(
        cfg.trainer, max_epochs=refit.epochs if refit else rc.max_epochs,
        min_epochs=refit.epochs if refit else rc.min_epochs, callbacks=callbacks,
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
        trainer.fit(task, train_dataloaders=train_dl, val_dataloaders=None if refit else val_dl, ckpt_path=ckpt_path)
    train_seconds = time.perf_counter() - t_start
    if not trainer.is_global_zero:  # another rank of a distributed fit: rank 0 evaluates, exports, indexes
        return {}
    if refit is not None:
        return _refit_outputs(rc, tables, out_dir, task.model.cpu().eval(), layout, feats, rows, refit,
                              num_mean, num_std, seed, throughput, len(tt), train_seconds)

    best_path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else ckpt_dir / "best.ckpt"
    best = torch.load(best_path, map_location="cpu", weights_only=False)
    task.load_state_dict(best["state_dict"], strict=False)
    model = task.model.cpu().eval()

    # ---- evaluation: validation (the selection set) and test, each against both baselines
    # The prior's weight beta is chosen on validation with the selected checkpoint, then fixed for test.
    kw = dict(recall_ks=list(rc.eval_ks), ndcg_ks=list(rc.ndcg_ks))
    uv_val, iv_val = tower_vectors(model, val)
    monitor_first = [rc.monitor_k] + [k for k in rc.eval_ks if k != rc.monitor_k]
    seen = rows[rows["period"] != "test"]
    test_es = make_eval_set(seen, test, feats.item_ids, signal)
    val_base, test_base, tuning = _baselines(rc, train, valid, seen, feats.item_ids, val_es, test_es, split, seed)
    # The MF weight and the prior's beta are chosen together on validation with the selected checkpoint.
    mf_val, beta, sweep, mf_sweep = _mf_sweep(rc, tuning, train, feats, tables, layout, val, val_es, uv_val,
                                              iv_val, monitor_first, seed)
    mf_weight = mf_val.weight if mf_val is not None else 0.0
    val_metrics_vectors = _with_prior(*_with_mf(uv_val, iv_val, mf_val, val.user_cat, val_es.candidates), beta, val.prior)
    val_metrics, _ = evaluate_all(val_es, *val_metrics_vectors, val_base, **kw)
    val_metrics["prior_sweep"] = {str(b): m for b, m in sweep.items()}
    val_metrics["baseline_sweep"] = tuning
    if mf_sweep:
        val_metrics["mf_weight_sweep"] = mf_sweep
    test_prior = log_prior(rc, seen, feats.item_ids, int(split["test_start"]))
    test_in = _val_inputs(test_es, test, layout, feats, test_block, test_prior)
    uv_tt, iv_tt = tower_vectors(model, test_in)
    mf_test = (_mf_fit(rc, seen, feats, tables, layout.user_cat_sizes[0], tuning["mf"]["params"], mf_weight, seed)
               if mf_weight > 0 else None)
    uv, iv = _with_prior(*_with_mf(uv_tt, iv_tt, mf_test, test_in.user_cat, test_es.candidates), beta, test_in.prior)
    if mf_test is not None:  # what the MF dimensions add: the towers alone, with their own best beta
        beta_tt = float(mf_sweep["0.0"]["beta"]) if "0.0" in mf_sweep else beta
        uv0, iv0 = _with_prior(uv_tt, iv_tt, beta_tt, test_in.prior)
        test_base["two_tower_alone"] = lambda u: uv0[u] @ iv0.T
    metrics, curves = evaluate_all(test_es, uv, iv, test_base, **kw)
    window = int(tuning.get("covisit", {}).get("params", {}).get("window", 10))
    val_ch = _channels(rc, train, valid, val_es, layout, feats, tables, window, int(split["valid_start"]),
                       lambda u: val_metrics_vectors[0][u] @ val_metrics_vectors[1].T, None)
    quotas = max(val_ch["merged"], key=lambda r: r[f"recall@{rc.channel_total}"])["quotas"]
    test_ch = _channels(rc, seen, test, test_es, layout, feats, tables, window, int(split["test_start"]),
                        lambda u: uv[u] @ iv.T, [quotas])
    metrics["channels"] = {"quotas": quotas, "k": rc.channel_total, "single": test_ch["single"],
                           "merged": test_ch["merged"][0][f"recall@{rc.channel_total}"]}
    val_metrics["channel_sweep"] = val_ch
    plot_curves(curves, out_dir / "recall_vs_k.png", f"test period: Recall@K ({metrics['test_users']} users)")

    # ---- export, catalogue vectors, channels, index
    mf_ship = (_mf_fit(rc, rows, feats, tables, layout.user_cat_sizes[0], tuning["mf"]["params"], mf_weight, seed)
               if mf_weight > 0 else None)
    shipped = _ship(rc, out_dir, model, beta, layout, feats, tables, rows, num_mean, num_std, seed, window,
                    lambda: uv, "test-period users' query vectors", mf_ship)

    best_epoch = int(best["epoch"])
    training = {
        "epochs": int(trainer.current_epoch),
        "best_epoch": best_epoch,
        "stopped_early": bool(trainer.current_epoch < rc.max_epochs),
        "resumed_from_epoch": resumed_from,
        "epochs_run_now": len(throughput.epochs),
        "train_positives": len(tt),
        "train_weight": round(float(tt.weight.sum()), 1),
        "samples_per_s": round(throughput.samples_per_s, 1),  # rank 0's share in a distributed fit
        "world_size": trainer.world_size,
        "wall_seconds": round(train_seconds, 1),
        "val_history": history.rows,
    }
    metrics = {**metrics, "valid": val_metrics, "training": training,
               "protocol": {"signal": signal, "seen_periods": ["train", "valid"], "evaluated_period": "test",
                            "recent_days": rc.recent_days, "prior_beta": beta, "mf_weight": mf_weight,
                            "baselines": {n: t["params"] for n, t in tuning.items()}}}
    (out_dir / METRICS).write_text(json.dumps(metrics, indent=2))
    if history.rows:
        _plot_history(history.rows, out_dir / "val_recall_by_epoch.png", task.val_metric)

    meta = _meta(rc, shipped, beta, quotas, window, {n: t["params"] for n, t in tuning.items()},
                 {k: v for k, v in training.items() if k != "val_history"}, metrics)
    (out_dir / RETRIEVAL_JSON).write_text(json.dumps(meta, indent=2))
    _log_mlflow(out_dir, metrics, shipped.index, shipped.parity)
    return metrics


@dataclass
class _Shipped:
    """What the stage ships to the bundle: towers (parity-checked), item vectors, channel tables, index."""

    parity: dict[str, float]
    item_vectors: np.ndarray
    item_ids: np.ndarray
    index: Any
    towers: tuple[Tower, Tower]  # user, item
    query_source: str
    mf_dim: int = 0
    mf_weight: float = 0.0


def _ship(rc: RetrievalConfig, out_dir: Path, model: TwoTower, beta: float, layout: InputLayout, feats: ItemFeatures,
          tables: FeatureTables, rows: pd.DataFrame, num_mean: np.ndarray, num_std: np.ndarray, seed: int,
          window: int, queries: Callable[[], np.ndarray], query_source: str, mf: _MF | None = None) -> _Shipped:
    """Export the towers (the user tower carrying the prior's beta and the MF user factors), the catalogue
    vectors, the channel tables and the index; ``queries()`` (called after the export) gives the
    index-recall query vectors."""
    user_make, item_make = _random_inputs(layout, num_mean, num_std, seed)
    user_tower = PriorUserTower(model.user_tower, beta, torch.from_numpy(mf.table) if mf else None).eval()
    if mf is not None:  # also inside the user tower graph; this copy is for eager re-use (bench/naive_path.py)
        np.save(out_dir / MF_USER_FACTORS, mf.table)
    export_onnx(user_tower, user_make(2), out_dir / USER_TOWER_ONNX, ["user_vec"])
    export_onnx(model.item_tower, item_make(2), out_dir / ITEM_TOWER_ONNX, ["item_vec"])
    parity = {
        "user_tower": check_parity(user_tower, out_dir / USER_TOWER_ONNX, user_make).max_abs_diff,
        "item_tower": check_parity(model.item_tower, out_dir / ITEM_TOWER_ONNX, item_make).max_abs_diff,
    }
    if max(parity.values()) > PARITY_TOL:
        raise RuntimeError(f"ONNX parity failed: max abs diff {parity} > {PARITY_TOL}")
    # Served vectors: the prior counted over every row of the bundle's data (what serving knows).
    serve_prior = log_prior(rc, rows, feats.item_ids, int(rows["ts"].max()) + 1)
    item_vectors = np.hstack([onnx_vectors(out_dir / ITEM_TOWER_ONNX, layout.item_arrays(tables.items)),
                              mf.items if mf else np.zeros((len(tables.items), 0), np.float32),
                              serve_prior.reshape(-1, 1)]).astype(np.float32)
    np.save(out_dir / ITEM_VECTORS, item_vectors)
    build_tables(rows, tables.items, tables.users["user_id"].astype(str).to_numpy(), rc.positive_signal, window,
                 rc.covisit_top, rc.recent_days, int(rows["ts"].max()) + 1).save(out_dir / CHANNELS)
    index = build_and_measure(
        item_vectors, queries(), rc.index_factory, out_dir / FAISS_INDEX, rc.index_recall_k, rc.hnsw_ef_search,
        rc.ivf_nprobe, seed, rc.hnsw_ef_construction,
    )
    mf_dim = mf.items.shape[1] if mf else 0
    return _Shipped(parity, item_vectors, feats.item_ids, index,
                    layout.towers(rc.embedding_dim + mf_dim + 1, rc.embedding_dim), query_source, mf_dim,
                    mf.weight if mf else 0.0)


def _meta(rc: RetrievalConfig, shipped: _Shipped, beta: float, quotas: dict, window: int, baselines: dict,
          training: dict, metrics: dict) -> dict:
    """``retrieval.json``: what serving needs to run the towers, the index and the channels, and the metrics."""
    index = shipped.index
    user_tower, item_tower = shipped.towers
    spec = RetrievalSpec(
        format_version=RETRIEVAL_FORMAT_VERSION,
        embedding_dim=rc.embedding_dim + shipped.mf_dim + 1,
        opset=OPSET,
        user_tower=user_tower,
        item_tower=item_tower,
        files=RetrievalFiles(USER_TOWER_ONNX, ITEM_TOWER_ONNX, ITEM_VECTORS, FAISS_INDEX, CHANNELS),
        item_vectors=ItemVectors(ITEM_VECTORS, "float32", list(shipped.item_vectors.shape),
                                 "items.parquet rows (row i = items.parquet row i)", "serving snapshot of items.parquet",
                                 shipped.item_ids.tolist()),
        index=IndexSpec(FAISS_INDEX, index.factory, "inner_product", index.ntotal, index.search_params, other={
            "rows": "same as item_vectors", f"recall@{index.k}_vs_exact": index.recall_vs_exact,
            "recall_queries": index.queries, "recall_query_source": shipped.query_source}),
        prior=Prior(beta, rc.embedding_dim + shipped.mf_dim, rc.prior_days, "beta (constant)",
                    "log(1 + training weight of the item's rows)"),
        mf=MatrixFactors(shipped.mf_weight, [rc.embedding_dim, rc.embedding_dim + shipped.mf_dim],
                         "weight x ALS user factors by user_id_idx (0 for unknown users)", "ALS item factors",
                         "every row of the bundle's data", MF_USER_FACTORS if shipped.mf_dim else None),
        channels=Channels(CHANNELS, quotas, list(quotas), Covisit(window, rc.covisit_top, rc.positive_signal),
                          rc.recent_days, "every item shown to each users.parquet user",
                          "items.parquet rows; seen rows = users.parquet rows"),
        other={
            "similarity": "inner product: L2-normalised tower outputs, then the MF factors (if any), then the "
                          "popularity prior's dimension",
            "temperature": rc.temperature,
            "positive_signal": rc.positive_signal,
            "baselines": baselines,  # chosen on validation; evaluate refits them
            "parity": {"max_abs_diff": shipped.parity, "tolerance": PARITY_TOL},
            "config": asdict(rc),
            "training": training,
            "metrics": {k: metrics[k] for k in ("model", "baselines", "test_users", "channels") if k in metrics},
        },
    )
    return spec.to_json()


def _refit_outputs(rc: RetrievalConfig, tables: FeatureTables, out_dir: Path, model: TwoTower, layout: InputLayout,
                   feats: ItemFeatures, rows: pd.DataFrame, refit: RefitPlan, num_mean: np.ndarray,
                   num_std: np.ndarray, seed: int, throughput: Throughput, positives: int,
                   train_seconds: float) -> dict:
    """The refit ships with the held-out fit's prior weight, channel quotas and baseline settings;
    ``retrieval.json`` carries the held-out metrics."""
    held = refit.held_out
    protocol = held.get("protocol", {})
    beta = float(protocol.get("prior_beta", 0.0))
    baselines = protocol.get("baselines", {})
    window = int(baselines.get("covisit", {}).get("window", 10))
    quotas = held.get("channels", {}).get("quotas", {"ann": rc.channel_total})
    mf_weight = float(protocol.get("mf_weight", 0.0))
    mf = (_mf_fit(rc, rows, feats, tables, layout.user_cat_sizes[0], baselines["mf"], mf_weight, seed)
          if mf_weight > 0 else None)
    # The index's recall is measured on the exported user tower's vectors of users' latest rows.
    shipped = _ship(rc, out_dir, model, beta, layout, feats, tables, rows, num_mean, num_std, seed, window,
                    lambda: onnx_vectors(out_dir / USER_TOWER_ONNX, _refit_queries(rows, layout, 2000, seed)),
                    "refit: users' latest training rows", mf)
    training = {"epochs": refit.epochs, "train_positives": positives,
                "samples_per_s": round(throughput.samples_per_s, 1), "wall_seconds": round(train_seconds, 1)}
    meta = _meta(rc, shipped, beta, quotas, window, baselines, training, held)
    meta["refit"] = {"epochs": refit.epochs, "rows": len(rows)}
    (out_dir / RETRIEVAL_JSON).write_text(json.dumps(meta, indent=2))
    report = {"training": training, "index_recall_vs_exact": shipped.index.recall_vs_exact,
              "parity_max_abs_diff": max(shipped.parity.values()), "prior_beta": beta, "mf_weight": mf_weight}
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({"refit/retrieval/samples_per_s": training["samples_per_s"],
                            "refit/retrieval/index_recall_vs_exact": shipped.index.recall_vs_exact})
        mlflow.log_artifact(str(out_dir / RETRIEVAL_JSON), artifact_path="refit/retrieval")
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


def _mlflow_name(name: str) -> str:
    return name.replace("@", "_at_")


def _log_mlflow(out_dir: Path, metrics: dict, index, parity: dict) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    flat = {}
    for name, v in metrics["model"].items():
        flat[f"retrieval/test/model/{_mlflow_name(name)}"] = v
    for b, vals in metrics["baselines"].items():
        for name, v in vals.items():
            flat[f"retrieval/test/{b}/{_mlflow_name(name)}"] = v
    ch = metrics.get("channels")
    if ch:
        for name, v in ch["single"].items():
            flat[f"retrieval/test/channel_{name}/recall_at_{ch['k']}"] = v
        flat[f"retrieval/test/channels_merged/recall_at_{ch['k']}"] = ch["merged"]
    flat["retrieval/test_users"] = metrics["test_users"]
    flat["retrieval/index_recall_vs_exact"] = index.recall_vs_exact
    flat["retrieval/parity_max_abs_diff"] = max(parity.values())
    flat["retrieval/samples_per_s_mean"] = metrics["training"]["samples_per_s"]
    mlflow.log_metrics({k: float(v) for k, v in flat.items() if v == v})
    # Tags, not params: a resumed fit may log them again with other values.
    mlflow.set_tags({"retrieval.train_positives": metrics["training"]["train_positives"],
                     "retrieval.best_epoch": metrics["training"]["best_epoch"],
                     "retrieval.candidates": metrics.get("candidates", 0)})
    for f in sorted(out_dir.iterdir()):
        if f.is_file():
            mlflow.log_artifact(str(f), artifact_path="retrieval")
