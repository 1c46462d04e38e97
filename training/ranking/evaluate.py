"""Score rows with exported rankers (ONNX Runtime) and build the ``ranking`` metrics section.

The same :func:`build_report` serves fit time (test period) and later logs (``evaluate_ranking``), so
numbers compare. Fusion NDCG@K, per scenario with weights w over heads:

- score of an impression = sum_h w_h * prediction_h (binary heads: probability; watch_time: predicted
  duration-debiased watch quantile);
- gain of an impression = max(0, sum_h w_h * real_h) (binary heads: the logged 0/1 signal; watch_time: the
  real watch quantile within the item's duration bucket, from train statistics). Negative weights (hate)
  take credit away; the clip at 0 keeps NDCG in [0, 1];
- NDCG@K per user over that user's impressions in the evaluated period, averaged over users with >= 2
  impressions and at least one impression of positive gain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.contract import RANKING, RANKING_JSON
from features.tables import FeatureTables
from training.config import TrainConfig
from training.ranking.data import DURATION, FeatureLayout
from training.ranking.metrics import bootstrap_auc_difference, bootstrap_auc_interval, head_report, ndcg_at_k, watch_report
from training.ranking.watch_time import WatchTimeQuantiles

CHUNK = 16384


def score_onnx(path: Path, inputs: dict[str, np.ndarray], threads: int = 2) -> list[np.ndarray]:
    """Run an exported ranker over all rows in chunks: [scores (N, T), watch_time_s (N,) if present]."""
    from training.onnx_export import session

    sess = session(path, threads=threads)
    names = [o.name for o in sess.get_outputs()]
    n = len(next(iter(inputs.values())))
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for a in range(0, n, CHUNK):
        out = sess.run(names, {k: v[a : a + CHUNK] for k, v in inputs.items()})
        for i, o in enumerate(out):
            parts[i].append(o)
    return [np.concatenate(p) if p else np.zeros((0,)) for p in parts]


def watch_quantile_truth(rows: pd.DataFrame, wtq: WatchTimeQuantiles, signal: str) -> np.ndarray:
    return wtq.encode(rows[DURATION].to_numpy(np.float64), rows[signal].to_numpy(np.float64))


def fusion_gains(rows: pd.DataFrame, heads: list[tuple[str, str]], weights: dict[str, float],
                 watch_truth: np.ndarray | None) -> np.ndarray:
    g = np.zeros(len(rows))
    for name, kind in heads:
        w = weights.get(name, 0.0)
        if w == 0:
            continue
        real = np.nan_to_num(watch_truth) if kind == "watch_time" else rows[name].to_numpy(np.float64)
        g += w * real
    return np.clip(g, 0, None)


def fused(scores: np.ndarray, heads: list[tuple[str, str]], weights: dict[str, float]) -> np.ndarray:
    w = np.array([weights.get(n, 0.0) for n, _ in heads])
    return np.nan_to_num(scores.astype(np.float64)) @ w


def item_rate_scores(rows: pd.DataFrame, heads: list[tuple[str, str]]) -> np.ndarray:
    """The non-neural baseline: each row's time-correct smoothed item rate per binary head; for the watch
    head the item's mean watch ratio (capped at 1) stands in for the watch quantile."""
    cols = []
    for name, kind in heads:
        col = "item_watch_ratio" if kind == "watch_time" else f"item_rate_{name}"
        v = rows[col].to_numpy(np.float64) if col in rows else np.full(len(rows), np.nan)
        cols.append(np.clip(v, 0, 1) if kind == "watch_time" else v)
    return np.stack(cols, axis=1)


def build_report(
    rows: pd.DataFrame,
    heads: list[tuple[str, str]],
    wtq: WatchTimeQuantiles | None,
    scenarios: dict[str, dict[str, float]],
    model: tuple[np.ndarray, np.ndarray | None],
    single_task: dict[str, tuple[np.ndarray, np.ndarray | None]] | None,
    ece_bins: int,
    fusion_k: int,
    seed: int = 0,
    baselines: dict[str, dict[str, np.ndarray]] | None = None,
    rare_positives: int = 300,
    bootstrap_samples: int = 200,
) -> dict[str, Any]:
    """``model`` = (scores (N, T), watch ms (N,) or None); ``single_task`` = head -> (scores (N, 1), watch ms);
    ``baselines`` = name (``gbdt``, ``deep``) -> head -> (N,) probabilities. A head with fewer than ``rare_positives`` positives gets a
    user-bootstrap 95% interval of its AUC and a verdict against the item-rate AUC; every head with a GBDT
    baseline gets the AUC difference to it with a paired user-bootstrap 95% interval (``vs_gbdt``)."""
    users = rows["user_id"].to_numpy()
    binary = [(t, n) for t, (n, k) in enumerate(heads) if k == "binary"]
    watch = [(t, n) for t, (n, k) in enumerate(heads) if k == "watch_time"]
    scores, watch_ms = model
    rates = item_rate_scores(rows, heads)
    report: dict[str, Any] = {"model": {}, "baselines": {"item_rate": {}, "single_task": {}}}
    for t, name in binary:
        y = rows[name].to_numpy()
        report["model"][name] = head_report(y, scores[:, t], users, ece_bins)
        if np.isfinite(rates[:, t]).all():
            report["baselines"]["item_rate"][name] = head_report(y, rates[:, t], users, ece_bins)
        if single_task and name in single_task:
            report["baselines"]["single_task"][name] = head_report(y, single_task[name][0][:, 0], users, ece_bins)
        for base, by_head in (baselines or {}).items():
            if name in by_head:
                report["baselines"].setdefault(base, {})[name] = head_report(y, by_head[name], users, ece_bins)
        m = report["model"][name]
        if 0 < m["positives"] < rare_positives and name in report["baselines"]["item_rate"]:
            lo, hi = bootstrap_auc_interval(y, scores[:, t], users, bootstrap_samples, seed)
            ir = report["baselines"]["item_rate"][name]["auc"]
            m["auc_ci95"] = [lo, hi]
            m["vs_item_rate"] = "not distinguishable" if lo <= ir <= hi else ("above" if lo > ir else "below")
        gbdt = (baselines or {}).get("gbdt", {})
        if name in gbdt and 0 < m["positives"] < m["impressions"]:
            d, lo, hi = bootstrap_auc_difference(y, scores[:, t], gbdt[name], users, bootstrap_samples, seed)
            m["vs_gbdt"] = {"auc_diff": d, "ci95": [lo, hi],
                            "verdict": "not distinguishable" if lo <= 0 <= hi else ("above" if lo > 0 else "below")}
    if not report["baselines"]["single_task"]:
        del report["baselines"]["single_task"]

    truth_q = None
    if watch and wtq is not None:
        t, name = watch[0]
        true_ms = rows[name].to_numpy(np.float64)
        truth_q = watch_quantile_truth(rows, wtq, name)
        wt = watch_report(true_ms, watch_ms) if watch_ms is not None else {}
        base: dict[str, Any] = {}
        dur = rows[DURATION].to_numpy(np.float64)
        if "item_watch_ratio" in rows:
            base["item_watch_ratio"] = watch_report(true_ms, rows["item_watch_ratio"].to_numpy(np.float64) * dur)
        base["duration_only"] = watch_report(true_ms, dur)
        if single_task and name in single_task and single_task[name][1] is not None:
            base["single_task"] = watch_report(true_ms, single_task[name][1])
        wt["baselines"] = base
        report["watch_time"] = wt

    rng = np.random.default_rng(seed)
    noise = rng.random(len(rows))
    report["fusion"] = {}
    for sc, weights in scenarios.items():
        gains = fusion_gains(rows, heads, weights, truth_q)
        m, n_users = ndcg_at_k(fused(scores, heads, weights), gains, users, fusion_k)
        entry = {f"ndcg@{fusion_k}": m, "users": n_users}
        entry[f"item_rate_ndcg@{fusion_k}"] = ndcg_at_k(fused(rates, heads, weights), gains, users, fusion_k)[0]
        if single_task and all(n in single_task for n, _ in heads):
            st = np.concatenate([single_task[n][0] for n, _ in heads], axis=1)
            entry[f"single_task_ndcg@{fusion_k}"] = ndcg_at_k(fused(st, heads, weights), gains, users, fusion_k)[0]
        entry[f"random_ndcg@{fusion_k}"] = ndcg_at_k(noise, gains, users, fusion_k)[0]
        report["fusion"][sc] = entry

    def mean_auc(d: dict[str, Any]) -> float:
        vals = [v["auc"] for v in d.values() if np.isfinite(v["auc"])]
        return float(np.mean(vals)) if vals else float("nan")

    report["summary"] = {
        "model_mean_auc": mean_auc(report["model"]),
        "item_rate_mean_auc": mean_auc(report["baselines"]["item_rate"]),
        "impressions": len(rows),
        "users": int(rows["user_id"].nunique()),
    }
    for base in report["baselines"]:
        if base != "item_rate":
            report["summary"][f"{base}_mean_auc"] = mean_auc(report["baselines"][base])
    return report


def load_meta(ranking_dir: Path) -> dict[str, Any]:
    path = Path(ranking_dir) / RANKING_JSON
    if not path.exists():
        raise FileNotFoundError(f"no ranker metadata at {path}: train with `python -m training fit --stage ranking`")
    return json.loads(path.read_text())


def score_bundle(ranking_dir: Path, meta: dict[str, Any], inputs: dict[str, np.ndarray]) -> tuple[
        tuple[np.ndarray, np.ndarray | None], dict[str, tuple[np.ndarray, np.ndarray | None]]]:
    """Model and single-task outputs (ONNX Runtime); watch time converted to ms."""

    def run(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
        out = score_onnx(path, inputs)
        return out[0], (out[1].astype(np.float64) * 1000.0 if len(out) > 1 else None)

    model = run(ranking_dir / meta["onnx"])
    single = {h: run(ranking_dir / f) for h, f in meta.get("single_task", {}).items() if (ranking_dir / f).exists()}
    return model, single


def evaluate_ranking(bundle_dir: Path, rows: pd.DataFrame, tables: FeatureTables, cfg: TrainConfig) -> dict:
    """Evaluate a trained bundle on a later log (rows from ``features.external.read_later_log``)."""
    ranking_dir = Path(bundle_dir) / RANKING
    meta = load_meta(ranking_dir)
    layout = FeatureLayout.from_json(meta["layout"])
    heads = [(h["name"], h["kind"]) for h in meta["heads"]]
    missing = [n for n, k in heads if n not in rows.columns]
    if missing:
        raise ValueError(f"the later log lacks the signals of heads {missing}; it has {sorted(rows.columns)}")
    prepared = layout.prepare(rows, tables).reset_index(drop=True)
    inputs = layout.arrays(prepared)
    model, single = score_bundle(ranking_dir, meta, inputs)
    wtq = WatchTimeQuantiles.from_json(meta["watch_time"]) if meta.get("watch_time") else None
    gbdt = bundle_gbdt(ranking_dir, meta, inputs)
    return build_report(prepared, heads, wtq, meta["scenarios"], model, single or None,
                        cfg.ranking.ece_bins, cfg.ranking.fusion_k, cfg.seed,
                        baselines={"gbdt": gbdt} if gbdt else None)


def bundle_gbdt(ranking_dir: Path, meta: dict[str, Any], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """head -> (N,) probabilities of the bundle's own LightGBM models on ``inputs``: the trees of the hybrid
    ranker, each the GBDT baseline of its head (same features, same days, early-stopped on validation; in a
    refit bundle retrained on every day with those tree counts). So a later log is judged against the plain
    GBDT too (``ranking.baselines.gbdt``, ``vs_gbdt``): every tree each was fitted to, where the graph serves
    only the first (``ranking.hybrid_max_trees``). Empty for a bundle without trees."""
    from training.ranking.gbdt import gbdt_margins, load_boosters

    hybrid = meta.get("hybrid") or {}
    files = hybrid.get("gbdt_files") or {}
    if not files:
        return {}
    trees = load_boosters(ranking_dir, files, hybrid.get("baseline_rounds") or hybrid["gbdt_rounds"])
    margins = gbdt_margins(trees, list(files), inputs)
    trees.margins = {"later": {h: margins[:, t] for t, h in enumerate(files)}}
    return trees.scores("later")
