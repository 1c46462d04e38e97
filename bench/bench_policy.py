"""What the feed policy adds to one /recommend: k=20 from 500 ranked candidates, in process.

    .venv/bin/python bench/bench_policy.py --bundle runs/kuairand/bundle [--requests 2000]

Times (a) the policy alone (all steps, exposure tracker live) and (b) a whole Recommender.recommend call
with the configured policy vs the engagement-only policy (governance + fusion), on the same users.
Prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.bundle import load_bundle  # noqa: E402
from serving.config import ServeSettings, load_settings  # noqa: E402
from serving.policy_config import PolicyConfig  # noqa: E402
from serving.recommender import Recommender  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="runs/kuairand/bundle")
    ap.add_argument("--config", default=None)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--max-seconds", type=float, default=120)
    args = ap.parse_args()

    bundle = load_bundle(args.bundle)
    settings = load_settings(args.config, bundle.manifest.config)
    settings.serving.candidates = args.candidates
    full = Recommender(bundle, settings)
    base = Recommender(bundle, ServeSettings(settings.serving, PolicyConfig.engagement_only(settings.policy)))
    rng = np.random.default_rng(0)
    users = list(bundle.user_row)
    picks = [users[i] for i in rng.integers(0, len(users), args.requests)]
    policy_ms, full_ms, base_ms = [], [], []
    deadline = time.monotonic() + args.max_seconds
    for u in picks:  # warm up
        full.recommend(u, args.k), base.recommend(u, args.k)
        break
    for u in picks:
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        r = full.recommend(u, args.k)
        t1 = time.perf_counter()
        base.recommend(u, args.k)
        t2 = time.perf_counter()
        full_ms.append((t1 - t0) * 1e3)
        base_ms.append((t2 - t1) * 1e3)
        policy_ms.append(r.timings_ms["policy"])
    pm = np.array(policy_ms)
    out = {
        "bench": "policy", "bundle": str(args.bundle), "requests": len(pm), "k": args.k,
        "candidates": args.candidates,
        "policy_ms_p50": round(float(np.median(pm)), 3), "policy_ms_p99": round(float(np.percentile(pm, 99)), 3),
        "recommend_ms_p50": round(float(np.median(full_ms)), 3),
        "engagement_only_ms_p50": round(float(np.median(base_ms)), 3),
        "added_ms_p50": round(float(np.median(full_ms) - np.median(base_ms)), 3),
        "exposure_gini": round(full.exposure.current_gini, 4), "target_added_ms_p50": 1.0,
    }
    # The bar is on what the policy adds to the whole call (page building and the exposure candidates it ranks).
    out["pass"] = out["added_ms_p50"] < 1.0
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
