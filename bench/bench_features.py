"""Feature build wall time and peak memory on a dataset (default: the full 11-day KuaiRand slice).

    python bench/bench_features.py --set data.dir=../shared/data/kuairand-pure-subset

Prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.build import build_features  # noqa: E402
from features.config import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/kuairand.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, args.overrides + [f"output_dir={tmp}"])
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = build_features(cfg, force=True, progress=False)
            times.append(time.perf_counter() - t0)
    rows = res.manifest["validation"]["interactions"]["rows"]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times.sort()
    print(json.dumps({"bench": "features_build", "data_dir": cfg.data.dir, "rows": rows, "median_s": round(times[len(times) // 2], 2),
                      "min_s": round(times[0], 2), "peak_rss_mib": round(peak_mib), "repeats": args.repeats}))


if __name__ == "__main__":
    main()
