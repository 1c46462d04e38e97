"""Offline evaluation of the feed policy with the same code the service runs.

    python -m serving.offline --bundle runs/kuairand/bundle [--config configs/kuairand.yaml] [--k 20] --out policy.json

Every test-period user known to the bundle gets one page built from the items they were shown in the test
period (so every served item has real feedback): ranked by the bundle's ranker, then either the
configured policy or the engagement-only baseline (governance + fusion). Per arm: NDCG@k of the real
signals, creator exposure Gini and Lorenz curve, item coverage, high-quality share, fan delivery and
governance leaks (must be 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from serving.bundle import Bundle, load_bundle
from serving.config import ServeSettings, load_settings
from serving.policy import PolicyConfig, gini
from serving.recommender import Recommender


def _ndcg(gains: np.ndarray, all_gains: np.ndarray, k: int) -> float:
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float((gains[:k] * disc[: len(gains[:k])]).sum())
    ideal = np.sort(all_gains)[::-1][:k]
    idcg = float((ideal * disc[: len(ideal)]).sum())
    return dcg / idcg if idcg > 0 else float("nan")


def lorenz(x: np.ndarray, points: int = 11) -> list[float]:
    """Share of exposure held by the least-exposed fraction q of creators, q = 0, 0.1, ..., 1."""
    v = np.sort(np.asarray(x, np.float64))
    if v.sum() <= 0:
        return [0.0] * points
    cum = np.r_[0.0, np.cumsum(v) / v.sum()]
    q = np.linspace(0, 1, points)
    return [round(float(np.interp(p * len(v), np.arange(len(v) + 1), cum)), 4) for p in q]


def evaluate_policy(bundle: Bundle, settings: ServeSettings, k: int = 20, signals: tuple[str, ...] = ("long_view", "click"),
                    scenario: str | None = None, max_users: int | None = None) -> dict[str, Any]:
    path = bundle.path / "features" / "interactions.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the offline policy evaluation needs the bundle's test-period log")
    cols = ["user_id", "item_id", "period", *signals]
    log = pd.read_parquet(path, columns=cols)
    log = log[(log["period"] == "test") & log["user_id"].astype(str).isin(bundle.user_row.keys())]
    log = log[log["item_id"].astype(str).isin(bundle.item_row.keys())]
    groups = list(log.groupby(log["user_id"].astype(str), sort=True))
    if max_users:
        groups = groups[:max_users]
    arms = {"policy": Recommender(bundle, settings),
            "engagement_only": Recommender(bundle, ServeSettings(settings.serving, PolicyConfig.engagement_only()))}
    out: dict[str, Any] = {"users": len(groups), "k": k, "signals": list(signals)}
    for arm, rec in arms.items():
        st = rec._state
        name = rec._scenario(st, scenario)
        ndcg = {s: [] for s in signals}
        served_items: set[int] = set()
        candidate_items: set[int] = set()
        creator_counts = np.zeros(len(bundle.creator_ids))
        hq_share, fan_pages, fan_possible, leaks = [], 0, 0, 0
        for user, rows_df in groups:
            item_rows = np.array([bundle.item_row[str(i)] for i in rows_df["item_id"]], dtype=np.int64)
            rows, first = np.unique(item_rows, return_index=True)
            labels = {s: rows_df[s].to_numpy(np.float64)[first] for s in signals}
            row, hist = rec._user(bundle, user)
            preds, _ = rec._score(bundle, user, row, hist, rows, None)
            cands = rec._candidates(st, row, hist, rows, preds, name, None)
            page = st.policy.page(cands, k, name, rec.exposure)
            sel = rows[page.index]
            allowed = cands.allowed
            for s in signals:
                ndcg[s].append(_ndcg(labels[s][page.index], labels[s][allowed], k))
            candidate_items.update(rows[allowed].tolist())
            served_items.update(sel.tolist())
            np.add.at(creator_counts, bundle.item_creator[sel], 1)
            leaks += int((~st.servable[sel]).sum())
            if len(sel):
                hq_share.append(float(bundle.high_quality[sel].mean()))
            if (cands.fan_fresh & allowed).any():
                fan_possible += 1
                fan_pages += bool(cands.fan_fresh[page.index].any())
        exposed = creator_counts[creator_counts > 0]
        pool = np.zeros(len(bundle.creator_ids))
        pool[bundle.item_creator[list(candidate_items)]] = 1
        population = creator_counts[pool > 0]  # creators that had a chance to be served
        out[arm] = {
            **{f"ndcg@{k}_{s}": round(float(np.nanmean(v)), 4) if v else None for s, v in ndcg.items()},
            "creator_gini": round(gini(population), 4), "creator_gini_served": round(gini(exposed), 4),
            "lorenz": lorenz(population), "coverage": round(len(served_items) / max(1, len(candidate_items)), 4),
            "quality_share": round(float(np.mean(hq_share)), 4) if hq_share else None,
            "fan_delivery": round(fan_pages / fan_possible, 4) if fan_possible else None,
            "governance_leaks": leaks,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.offline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--scenario", default=None)
    ap.add_argument("--max-users", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    bundle = load_bundle(args.bundle)
    result = evaluate_policy(bundle, load_settings(args.config, bundle.manifest), args.k, scenario=args.scenario,
                             max_users=args.max_users)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
