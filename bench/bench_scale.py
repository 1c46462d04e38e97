"""How the stack scales with the log: a synthetic log of N rows, the feature build, one epoch of each stage.

    python bench/bench_scale.py --rows 200000 [--days 10] [--workdir DIR] [--set retrieval.batch_size=2048]
    python bench/bench_scale.py --workdir DIR --stages retrieval,ranking_stream   # reuse DIR's log and features

The log follows features/synthetic.py's world (users with topic interests, creators with a latent quality
that items inherit, feedback from interest + quality, the same signals and raw KuaiRand layout) but is drawn
with vectorised numpy so millions of rows take seconds, and with a realistic skew: item popularity is Zipf
(exponent 1.1) within and across topics, user activity lognormal. Sizes grow with N: N/70 users, N/25
items, items/20 creators (the 185k-row KuaiRand sample has 27k users and 7.5k items).

Each stage runs in its own process (``--stage``), so its peak RSS (getrusage ru_maxrss) is its own:
``features`` is ``build_features`` with ``split.mode: all`` (what the production refit builds), on the
configured engine (``--set features.engine=pandas`` for the in-memory one); ``retrieval``
and ``ranking`` are the production refit path for one epoch (train every row, export ONNX, build the
index; no held-out evaluation, which is a separate cost), baselines off; ``retrieval_stream`` and
``ranking_stream`` are those stages with ``training.stream: true`` (training rows streamed from Parquet
through a bounded shuffle buffer). Prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from features.synthetic import DAY_MS, START_MS, _kuairand_config, _sigmoid  # noqa: E402

STAGE_SETTINGS = [
    "split.mode=all",
    "retrieval.baselines.als=false", "retrieval.baselines.covisit=false",
    "ranking.single_task_baselines=false", "ranking.gbdt_baseline=false", "ranking.hybrid=false",
]


def zipf_weights(n: int, rng: np.random.Generator, exponent: float = 1.1) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return w[rng.permutation(n)] / w.sum()


def make_log(rows: int, days: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(log, items, users) in KuaiRand's raw layout, about ``rows`` impressions over ``days`` days."""
    rng = np.random.default_rng(seed)
    U, I = max(300, rows // 70), max(400, rows // 25)
    C, T = max(40, I // 20), 16
    interest = rng.dirichlet(np.full(T, 0.3), size=U).astype(np.float32)
    creator_topic = rng.integers(0, T, C)
    creator_quality = rng.normal(0, 1, C)
    item_creator = rng.integers(0, C, I)
    item_topic = np.where(rng.random(I) < 0.85, creator_topic[item_creator], rng.integers(0, T, I))
    item_quality = creator_quality[item_creator] + rng.normal(0, 0.5, I)
    duration = np.clip(rng.lognormal(np.log(25_000), 0.8, I), 3_000, 600_000).round()
    pop = zipf_weights(I, rng)
    activity = rng.lognormal(0, 0.7, U)

    n = rows
    users = rng.choice(U, size=n, p=activity / activity.sum())
    items = rng.choice(I, size=n, p=pop)
    # 60% of impressions follow the user's interests: a topic drawn from the user's mix (inverse CDF on
    # the cumulative interest), then an item of that topic by the same Zipf popularity.
    by_interest = rng.random(n) < 0.6
    cum = np.cumsum(interest, axis=1)
    topic = (rng.random(n)[:, None] > cum[users]).sum(axis=1).clip(max=T - 1)
    for t in range(T):
        members = np.flatnonzero(item_topic == t)
        sel = np.flatnonzero(by_interest & (topic == t))
        if len(members) and len(sel):
            p = pop[members] / pop[members].sum()
            items[sel] = members[np.searchsorted(np.cumsum(p), rng.random(len(sel))).clip(max=len(members) - 1)]
    affinity = 4.0 * interest[users, item_topic[items]] + 0.8 * item_quality[items] - 0.6
    click = rng.random(n) < _sigmoid(affinity)
    ratio = np.clip(_sigmoid(affinity + rng.normal(0, 1, n)) * 1.3, 0, 3) * click
    dur = duration[items]
    watch = (ratio * dur).round()
    signals = {
        "is_click": click,
        "is_like": click & (rng.random(n) < _sigmoid(affinity - 3.5)),
        "is_follow": click & (rng.random(n) < _sigmoid(affinity - 4.0)),
        "is_comment": click & (rng.random(n) < _sigmoid(affinity - 4.5)),
        "is_forward": click & (rng.random(n) < _sigmoid(affinity - 4.8)),
        "is_hate": rng.random(n) < _sigmoid(-1.5 * item_quality[items] - 4.5),
        "long_view": click & (watch >= np.minimum(dur, 18_000)),
        "is_profile_enter": click & (rng.random(n) < _sigmoid(affinity - 3.2)),
    }
    ts = START_MS + np.sort(rng.integers(0, days * DAY_MS, n))
    log = pd.DataFrame({"user_id": users, "video_id": items, "time_ms": ts,
                        **{k: v.astype(np.int8) for k, v in signals.items()},
                        "play_time_ms": watch.astype(np.int64), "duration_ms": dur.astype(np.int64),
                        "tab": rng.integers(0, 3, n)})
    log = log.drop_duplicates(["user_id", "video_id", "time_ms"])
    items_df = pd.DataFrame({"video_id": np.arange(I), "author_id": 1000 + item_creator, "tag": item_topic,
                             "visible_status": np.where(rng.random(I) < 0.05, 1, 0), "video_duration": duration,
                             "video_type": np.where(rng.random(I) < 0.05, "AD", "NORMAL")})
    users_df = pd.DataFrame({"user_id": np.arange(U),
                             "user_active_degree": np.where(activity > 1.2, "high", np.where(activity > 0.8, "mid", "low")),
                             "onehot_feat0": rng.integers(0, 3, U)})
    return log, items_df, users_df


def write_dataset(rows: int, days: int, seed: int, root: Path) -> Path:
    log, items, users = make_log(rows, days, seed)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    log.to_parquet(data / "log.parquet", index=False)
    items.to_csv(data / "items.csv", index=False)
    users.to_csv(data / "users.csv", index=False)
    cfg = _kuairand_config(data, root / "out")
    cfg["data"]["interactions"]["file"] = "log.parquet"
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_stage(stage: str, config: str, overrides: list[str]) -> dict:
    """One stage in this process; returns its figures (peak RSS is this process's)."""
    from features.build import build_features
    from features.config import load_config
    from features.tables import FeatureTables
    from training.config import TrainConfig

    streamed = ["training.stream=true"] if stage.endswith("_stream") else []
    cfg = load_config(config, STAGE_SETTINGS + overrides + streamed, TrainConfig)
    t0 = time.perf_counter()
    out: dict = {}
    if stage == "features":
        res = build_features(cfg, force=True, progress=False)
        out["rows"] = res.manifest["rows"]["train"]
        out["engine"] = cfg.features.engine
        if cfg.features.engine == "duckdb":
            out["memory_limit"] = cfg.features.memory_limit
    else:
        from training.__main__ import _quiet_lightning
        from training.refit import RefitPlan

        _quiet_lightning()
        tables = FeatureTables.load(cfg.features_dir)
        if stage.startswith("retrieval"):
            from training.retrieval.pipeline import fit_retrieval

            rep = fit_retrieval(cfg, tables, Path(cfg.output_dir) / "retrieval", progress=False,
                                refit=RefitPlan(epochs=1))
            out["train_positives"] = rep["training"]["train_positives"]
        else:
            from training.ranking.pipeline import fit_ranking

            heads = cfg.ranking.resolve_heads(list(tables.spec["binary_signals"]), tables.spec.get("watch_time_signal"))
            ident = {"scale": [1.0] * len(heads), "bias": [0.0] * len(heads)}
            rep = fit_ranking(cfg, tables, Path(cfg.output_dir) / "ranking", progress=False,
                              refit=RefitPlan(epochs=1, calibration=ident))
            out["train_samples"] = rep["training"]["train_samples"]
        out["samples_per_s"] = rep["training"]["samples_per_s"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--days", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep the data and outputs here (default: a temp dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--stages", default="features,retrieval,ranking",
                    help="comma-separated, in order, from features, retrieval, retrieval_stream, ranking, "
                         "ranking_stream (the *_stream stages with training.stream: true)")
    ap.add_argument("--stage", choices=("features", "retrieval", "retrieval_stream", "ranking", "ranking_stream"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:  # a child: one stage, one JSON line
        print(json.dumps(run_stage(args.stage, args.config, args.overrides)))
        return

    stages = args.stages.split(",")
    reuse = stages[0] != "features"
    if reuse and not (args.workdir and (Path(args.workdir) / "config.yaml").exists()):
        sys.exit("--stages: the training stages read the features, so 'features' comes first (or --workdir names "
                 "the folder of an earlier run whose features are reused)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        t0 = time.perf_counter()
        config = root / "config.yaml" if reuse else write_dataset(args.rows, args.days, args.seed, root)
        summary: dict = {"bench": "scale", "rows_requested": None if reuse else args.rows,
                         "days": None if reuse else args.days,
                         "generate_s": round(time.perf_counter() - t0, 1), "stages": {}}
        env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        summary["loadavg_1m_start"] = round(os.getloadavg()[0], 2)  # these machines are shared: say how busy
        for stage in stages:
            cmd = [sys.executable, __file__, "--stage", stage, "--config", str(config)]
            cmd += [a for s in args.overrides for a in ("--set", s)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"stage {stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            summary["stages"][stage] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{stage}: {summary['stages'][stage]}", file=sys.stderr, flush=True)
        if reuse:
            features = json.loads((root / "out" / "features" / "manifest.json").read_text())
            summary["reused_features"] = str(root)
            summary["rows"] = features["rows"]["train"]
        else:
            summary["rows"] = summary["stages"]["features"]["rows"]
        summary["cpu_count"] = os.cpu_count()
        summary["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
