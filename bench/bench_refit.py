"""What the production refit is worth, on a simulated later period.

The last day of the log is held back as the "later" log. The fit sees the days before it (its own
validation and test periods inside them); its held-out bundle and its refit bundle (every day it saw,
the same epochs and calibration) are then both evaluated on the held-back day with `training evaluate`.

    python bench/bench_refit.py --data-dir ../shared/data/kuairand-pure-subset --out runs/bench-refit

Prints a per-head table and a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from features.config import load_config  # noqa: E402


def _split_log(cfg, out: Path) -> tuple[Path, Path, str]:
    """Copy the dataset with its last local day cut off; return (data dir, later log, last day)."""
    d = cfg.data
    src = Path(d.dir)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for spec in (d.items, d.users):
        if spec is not None:
            shutil.copy(src / spec.file, data / spec.file)
    log = pd.read_csv(src / d.interactions.file)
    ts = pd.to_datetime(log[d.interactions.columns["ts"]], unit=d.interactions.time_unit, utc=True)
    local_day = (ts + pd.Timedelta(hours=d.utc_offset_hours)).dt.strftime("%Y-%m-%d")
    last = local_day.max()
    log[local_day < last].to_csv(data / d.interactions.file, index=False)
    later = out / f"later_{last}.csv.gz"
    log[local_day == last].to_csv(later, index=False)
    return data, later, last


def _run(args: list[str], env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(args)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/kuairand.yaml")
    ap.add_argument("--data-dir", default="../shared/data/kuairand-pure-subset")
    ap.add_argument("--out", default="runs/bench-refit")
    ap.add_argument("--valid-start", default="2022-05-02", help="validation start of the fit on the earlier days")
    ap.add_argument("--test-start", default="2022-05-04", help="test start of the fit on the earlier days")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    cfg = load_config(args.config, [f"data.dir={args.data_dir}"])
    data, later, last = _split_log(cfg, out)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    fit_dir = out / "fit"
    _run(["-m", "training", "fit", "--config", args.config, "--no-progress", "--set", f"data.dir={data}",
          "--set", f"output_dir={fit_dir}", "--set", f"split.valid_start={args.valid_start}",
          "--set", f"split.test_start={args.test_start}", "--set", "training.refit=true",
          "--set", "tracking.register=false", "--set", "ranking.single_task_baselines=false"], env)
    # The held-out bundle: the same run's held-out stage outputs, assembled without the refit.
    code = ("import json, sys; from pathlib import Path; from features.config import load_config; "
            "from training.config import TrainConfig; from training.bundle import assemble_bundle; "
            f"cfg = load_config({args.config!r}, ['data.dir={data}', 'output_dir={out / 'held_out'}'], TrainConfig); "
            f"m = json.loads(Path('{fit_dir / 'metrics.json'}').read_text()); "
            f"print(assemble_bundle(cfg, m, Path('{fit_dir}')))")
    _run(["-c", code], env)
    results = {}
    for name, bundle in (("held_out", out / "held_out" / "bundle"), ("refit", fit_dir / "bundle")):
        path = out / f"later_{name}.json"
        _run(["-m", "training", "evaluate", "--bundle", str(bundle), "--log", str(later), "--out", str(path)], env)
        results[name] = json.loads(path.read_text())
    heads = list(results["refit"]["ranking"]["model"])
    print(f"\nlater day {last}: {results['refit']['data']['impressions']} impressions")
    print("| head | positives | AUC held-out fit | AUC refit | GAUC held-out | GAUC refit |")
    print("|---|---|---|---|---|---|")
    summary = {"bench": "refit", "later_day": last}
    for h in heads:
        a, b = results["held_out"]["ranking"]["model"][h], results["refit"]["ranking"]["model"][h]
        if "auc" not in a:
            continue
        print(f"| {h} | {b.get('positives')} | {a['auc']:.4f} | {b['auc']:.4f} | {a.get('gauc', float('nan')):.4f} | "
              f"{b.get('gauc', float('nan')):.4f} |")
        summary[f"{h}_auc"] = [round(a["auc"], 4), round(b["auc"], 4)]
    for k in ("recall@100", "recall@200", "ndcg@100"):
        a, b = results["held_out"]["retrieval"]["model"][k], results["refit"]["retrieval"]["model"][k]
        print(f"retrieval {k}: held-out {a:.4f}, refit {b:.4f}")
        summary[f"retrieval_{k}"] = [round(a, 4), round(b, 4)]
    for name in ("held_out", "refit"):
        summary[f"unknown_items_{name}"] = results[name]["data"]["unknown_items"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
