"""Probe: two what-ifs on the page's fusion, judged by the channel choice itself (every arm, full feed policy).

    .venv/bin/python bench/probe_page_terms.py --config configs/kuairand.yaml --set output_dir=runs/kuairand \
        [--fixed-scale K | --trend-weight G] [choose-channels options: --max-users 0 --retrieval-weights 8 ...]

Runs ``python -m evaluation choose-channels --dry-run --no-mlflow`` (no bundle changes) with the page's
retrieval term replaced for the whole run:

``--fixed-scale K``: ``fused + w * K * affinity`` instead of today's per-request standardisation (the
retrieval score and the fused score are scaled by their spread over *this request's candidates*, so adding
candidates of another channel changes how the ones already there are ordered). With a constant scale the
order of two candidates never depends on which others were retrieved. ``--fixed-scale 0`` only measures K:
it prints the distribution of ``std(fused) / std(affinity)`` over the requests served, today's scale.

``--trend-weight G``: adds ``G`` standard deviations (the request's retrieval-score spread) of the
standardised ``-log(1 + trending rank)`` to the retrieval score (items off the trending list rank last): a
recent-popularity term in the page, what the trending channel does by restricting the candidates to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import serving.policy as policy  # noqa: E402
import serving.recommender as recommender  # noqa: E402
from evaluation import choose_channels  # noqa: E402

served_with_affinity = policy.with_affinity
served_affinity = recommender.Recommender.affinity


def fixed_scale(k: float):
    def with_affinity(fused, affinity, weight):
        if weight <= 0 or affinity is None or len(fused) < 2:
            return fused
        return (fused + weight * k * affinity.astype(np.float64)).astype(fused.dtype)
    return with_affinity


def measuring(ratios: list[float]):
    def with_affinity(fused, affinity, weight):
        if affinity is not None and len(fused) > 1 and weight > 0:
            sd = float(affinity.astype(np.float64).std())
            if sd > 0:
                ratios.append((float(np.std(fused)) or 1.0) / sd)
        return served_with_affinity(fused, affinity, weight)
    return with_affinity


def with_trend(g: float):
    feature: dict[int, np.ndarray] = {}

    def trend(b) -> np.ndarray:
        if id(b) not in feature:
            feature[id(b)] = -np.log1p(b.channels.list_rank("trending"))
        return feature[id(b)]

    def affinity(self, st, scenario, vec, rows):
        a = served_affinity(self, st, scenario, vec, rows)
        if a is None or len(rows) < 2 or st.bundle.channels is None:
            return a
        t = trend(st.bundle)[rows]
        sa, sd = float(a.std()), float(t.std())
        return a if sa == 0 or sd == 0 else a + g * sa * (t - t.mean()) / sd
    return affinity


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--fixed-scale", type=float, help="K of fused + w * K * affinity (0: measure today's K)")
    what.add_argument("--trend-weight", type=float, help="G, the trending term's weight in the retrieval score")
    choose_channels.add_arguments(ap)
    args = ap.parse_args()
    args.dry_run, args.no_mlflow = True, True
    ratios: list[float] = []
    if args.trend_weight is not None:
        recommender.Recommender.affinity = with_trend(args.trend_weight)
    else:
        patched = measuring(ratios) if args.fixed_scale == 0 else fixed_scale(args.fixed_scale)
        policy.with_affinity = recommender.with_affinity = patched
    choose_channels.run(args)
    if ratios:
        r = np.array(ratios)
        print(f"today's scale std(fused) / std(affinity) over {len(r)} requests: median {np.median(r):.3f}, "
              f"p10 {np.percentile(r, 10):.3f}, p90 {np.percentile(r, 90):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
