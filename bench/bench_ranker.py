"""Ranker latency and training throughput (a benchmark, not a test).

Scores one user's N candidates (default 500) with the ranker on 1 thread: ONNX Runtime vs PyTorch
``inference_mode`` on the same inputs in the same run; then a few training steps (forward, backward,
Adam) on 2 threads for samples/s. With ``--ranking-dir`` (a fitted ``<output_dir>/ranking``) it times the
shipped ``ranker.onnx`` (and the request graph ``ranker_request.onnx`` serving uses, when present) against
the same weights in torch (``checkpoints/best.ckpt``; a hybrid ranker's torch side adds LightGBM's own
``predict`` of its saved trees, and its deep part alone is exported and timed too, so the trees' cost is
measured in the same run); without one it
builds the default-config ranker for the features in ``--features`` (random weights: timing only).

    python bench/bench_ranker.py --ranking-dir runs/full/ranking --features runs/full/features

Prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.tables import FeatureTables  # noqa: E402
from training.onnx_export import export_onnx, session  # noqa: E402
from training.ranking.config import RankingConfig  # noqa: E402
from training.ranking.data import FeatureLayout  # noqa: E402
from training.checkpoints import load_eager_ranker  # noqa: E402
from training.ranking.model import NumericNormalizer, Ranker, RankerScorer, RankerSpec, embedding_dims  # noqa: E402
from training.ranking.watch_time import WatchTimeQuantiles  # noqa: E402


def one_user_candidates(layout: FeatureLayout, tables: FeatureTables, n: int, seed: int) -> dict[str, np.ndarray]:
    """A real user's attributes and history, n real catalogue items with their features."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    users = tables.users
    user = users.iloc[int(rng.integers(len(users)))]
    items = tables.items.sample(n=n, replace=len(tables.items) < n, random_state=seed).reset_index(drop=True)
    rows = items.copy()
    rows["user_id"] = user["user_id"]
    rows["user_id_idx"] = int(user["user_id_idx"])
    for c in layout.cat_columns:
        if c not in rows and c in users.columns:
            rows[c] = int(user[c])
    rows["tab_idx"] = 1
    rows["hour_idx"] = int(rng.integers(1, 25))
    for c in ("is_fan", "is_iron_fan", "fan_interactions"):
        rows[c] = 0
    rows["history"] = [np.asarray(user["history"], np.int64)] * n
    if "behaviour" in tables.spec:  # user, user x creator and item / creator x context columns, as served
        from features.behaviour import attach_serving

        for name, table in tables.behaviour.items():
            ctx = [c for c in table.columns if c in tables.context_columns]
            for c in ctx:
                rows[c] = table[c].mode().iloc[0] if len(table) else None
        beh = attach_serving(rows, tables.spec["behaviour"], users, tables.behaviour)
        rows = pd.concat([rows.drop(columns=[c for c in beh.columns if c in rows.columns]), beh], axis=1)
    rows = layout.prepare(pd.DataFrame(rows), tables)
    return layout.arrays(rows)


def time_it(fn, reps: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="runs/full/features")
    ap.add_argument("--ranking-dir", default=None)
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--train-steps", type=int, default=15)
    ap.add_argument("--train-batch", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tables = FeatureTables.load(args.features)
    rc = RankingConfig()
    with tempfile.TemporaryDirectory() as tmp:
        if args.ranking_dir:
            rdir = Path(args.ranking_dir)
            meta = json.loads((rdir / "ranking.json").read_text())
            scorer, layout, heads = load_eager_ranker(meta, rdir / "checkpoints" / "best.ckpt")
            spec = scorer.ranker.spec
            onnx_path = rdir / meta["onnx"]
            source = str(onnx_path)
        else:
            layout = FeatureLayout.from_tables(tables)
            heads = rc.resolve_heads(tables.spec["binary_signals"], tables.spec.get("watch_time_signal"))
            heads = [n for n, _ in heads]
            spec = RankerSpec(layout.cat_sizes, embedding_dims(layout.cat_sizes, rc.embedding_dim, rc.small_embedding_dim,
                                                               rc.small_vocab), layout.item_position,
                              len(layout.num_columns), heads, rc.architecture, rc.expert_hidden, rc.num_experts,
                              rc.shared_experts, rc.task_experts, rc.ple_levels, rc.tower_hidden, rc.dropout)
            ranker = Ranker(spec)
            inputs_ref = one_user_candidates(layout, tables, 2000, args.seed + 7)
            ranker.numeric.set_statistics(NumericNormalizer.statistics(inputs_ref["num"]))
            dur = inputs_ref["num"][:, layout.duration_position]
            wtq = WatchTimeQuantiles.fit(dur, dur * 0.3, rc.watch_time_buckets, rc.watch_time_grid)
            onnx_path = None
            source = "default config, random weights"
            watch = heads.index("watch_time") if "watch_time" in heads else None
            scorer = RankerScorer(ranker, watch, wtq, layout.duration_position).eval()
        feed = one_user_candidates(layout, tables, args.candidates, args.seed)
        tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
        if onnx_path is None:
            onnx_path = export_onnx(scorer, tensors, Path(tmp) / "ranker.onnx", scorer.output_names)

        torch.set_num_threads(1)
        sess = session(onnx_path, threads=1)
        onnx_out = sess.run(None, feed)
        with torch.inference_mode():
            eager = scorer(*tensors.values())
        diff = max(float(np.max(np.abs(e.numpy() - o))) for e, o in zip(eager, onnx_out))

        def run_torch() -> None:
            with torch.inference_mode():
                scorer(*tensors.values())

        # The serving graph (one request's shared columns once), when the ranking stage exported one.
        request_sess, request_diff, deep_sess = None, None, None
        if args.ranking_dir and meta.get("request_onnx"):
            request_sess = session(Path(args.ranking_dir) / meta["request_onnx"], threads=1)
            request_diff = max(float(np.max(np.abs(e.numpy() - o))) for e, o in zip(eager, request_sess.run(None, feed)))
        # A hybrid ranker: its deep part alone as a request graph (no trees), timed in the same rounds.
        if request_sess is not None and hasattr(scorer, "graph"):
            from training.ranking.model import RequestScorer

            const = meta["request_constant"]
            deep = RequestScorer(scorer.graph, const["cat"], const["num"]).eval()
            deep_sess = session(export_onnx(deep, tensors, Path(tmp) / "deep_request.onnx", scorer.output_names),
                                threads=1)

        # Interleave rounds so that drift in machine load hits every engine alike.
        ort_ms: list[float] = []
        torch_ms: list[float] = []
        request_ms: list[float] = []
        deep_ms: list[float] = []
        for _ in range(3):
            ort_ms += time_it(lambda: sess.run(None, feed), args.reps // 3)
            torch_ms += time_it(run_torch, args.reps // 3)
            if request_sess is not None:
                request_ms += time_it(lambda: request_sess.run(None, feed), args.reps // 3)
            if deep_sess is not None:
                deep_ms += time_it(lambda: deep_sess.run(None, feed), args.reps // 3)

    # Training throughput: forward + backward + Adam on 2 threads, batches drawn from the candidate pool.
    torch.set_num_threads(2)
    train_model = Ranker(spec).train()
    opt = torch.optim.Adam(train_model.parameters(), lr=1e-3)
    pool = one_user_candidates(layout, tables, args.train_batch, args.seed + 1)
    batch = {k: torch.from_numpy(v) for k, v in pool.items()}
    y = torch.from_numpy((np.random.default_rng(0).random((args.train_batch, len(heads))) < 0.2).astype(np.float32))

    def step() -> None:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(train_model(*batch.values()), y)
        loss.backward()
        opt.step()

    step_ms = time_it(step, args.train_steps, warmup=3)
    fit_sps = None
    if args.ranking_dir and (Path(args.ranking_dir) / "metrics.json").exists():
        fit_sps = json.loads((Path(args.ranking_dir) / "metrics.json").read_text()).get("training", {}).get("samples_per_s")

    ort_med, torch_med = statistics.median(ort_ms), statistics.median(torch_ms)
    summary = {
        "bench": "ranker",
        "source": source,
        "architecture": spec.architecture,
        "candidates": args.candidates,
        "threads": 1,
        "onnx_median_ms": round(ort_med, 3),
        "onnx_p99_ms": round(float(np.percentile(ort_ms, 99)), 3),
        "torch_median_ms": round(torch_med, 3),
        "torch_p99_ms": round(float(np.percentile(torch_ms, 99)), 3),
        "speedup": round(torch_med / ort_med, 2),
        "max_abs_diff": diff,
        "request_onnx_median_ms": round(statistics.median(request_ms), 3) if request_ms else None,
        "request_max_abs_diff": request_diff,
        "hybrid_trees": sum((meta.get("hybrid") or {}).get("gbdt_rounds", {}).values()) if args.ranking_dir else 0,
        "request_deep_only_median_ms": round(statistics.median(deep_ms), 3) if deep_ms else None,
        "train_step_samples_per_s_2threads": round(args.train_batch / (statistics.median(step_ms) / 1e3), 0),
        "fit_samples_per_s": fit_sps,
        "bar_onnx_lt_2p5ms": ort_med < 2.5,
        # serving scores a request's candidates with the request graph (ranker_request.onnx)
        "bar_request_onnx_lt_2p5ms": statistics.median(request_ms) < 2.5 if request_ms else None,
        "bar_speedup_ge_1p5": torch_med / ort_med >= 1.5,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
