"""Both feature engines on one dataset: build time, peak RSS, and whether their outputs are equal.

    python bench/compare_engines.py --set data.dir=../shared/data/kuairand-pure-subset [--repeats 3]

Each build runs in its own process (its peak RSS is its own), the engines alternating, ``--repeats`` times;
then features/compare_builds.py compares the two output folders (tables, row order, dtypes, values,
vocabularies, validation counts, quarantine files, manifest). Prints a one-line JSON summary last.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENGINES = ("pandas", "duckdb")


def child(config: str, overrides: list[str]) -> dict:
    from features.build import build_features
    from features.config import load_config

    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    build_features(cfg, force=True, progress=False)
    return {"seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/kuairand.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.config, args.overrides)))
        return
    from features.compare_builds import compare_builds

    runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for engine in ENGINES:
                sets = args.overrides + [f"features.engine={engine}", f"output_dir={Path(tmp) / engine}"]
                cmd = [sys.executable, __file__, "--child", "--config", args.config, *[a for s in sets for a in ("--set", s)]]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
                if proc.returncode:
                    sys.exit(f"{engine} build failed:\n{proc.stderr[-3000:]}")
                runs[engine].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        diffs = compare_builds(Path(tmp) / "pandas" / "features", Path(tmp) / "duckdb" / "features")
    summary = {"bench": "compare_engines", "overrides": args.overrides, "equal": not diffs, "differences": diffs[:20]}
    for engine, rs in runs.items():
        secs = sorted(r["seconds"] for r in rs)
        summary[engine] = {"median_s": secs[len(secs) // 2], "min_s": secs[0],
                           "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)}
    summary["loadavg_1m"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
