"""Probe: would a learned page fusion beat the served one (fused ranker score + w x retrieval score)?

    .venv/bin/python bench/probe_page_fusion.py --bundle runs/kuairand/heldout-bundle [--period valid]
        [--max-users 2000] [--out probe.json]

Serves each user of the period once through ``Recommender.recommend`` on the bundle as of the period's start
(as ``evaluation channels`` does), and keeps every candidate the page was chosen from with these signals:
the fused ranker score and the retrieval score (each standardised per request, as the page's fusion uses
them), every head's log prediction, the item's rank in the trending and fresh lists, its co-visitation score
from the user's history, and which channel brought it. Label: the user long-viewed it in the period.

The candidates are then ordered without the rest of the feed policy (no exposure, diversity or slots) by:
the weight-only fusion at several weights, a logistic regression on the two standardised scores, one on the
retrieval side's signals (the two scores, trending and fresh rank, co-visitation score: the head weights stay
the scenario's), one on every signal, and a LightGBM LambdaRank on every signal; each learned order is fitted on half of the users
and judged on the other half (two folds). ``--retrieved-only`` leaves the exposure step's candidates out of
every order (the feed policy places them, whatever the order). Printed: NDCG@20 of long views per order and its paired
user-bootstrap difference from the weight the bundle serves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluation.as_of import as_of  # noqa: E402
from evaluation.common import served_settings  # noqa: E402
from features.candidates import history_weights  # noqa: E402
from features.metrics import ndcg, paired_difference  # noqa: E402
from serving.bundle import load_bundle  # noqa: E402
from serving.candidates import CHANNEL_REASONS  # noqa: E402
from serving.offline_cases import own_period  # noqa: E402
from serving.policy import fuse  # noqa: E402
from serving.recommender import Recommender  # noqa: E402

K = 20


class _Capturing(Recommender):
    """The service's request path, keeping what the page of the last request was chosen from: the candidates'
    channels, the ranker's predictions and the retrieval scores."""

    last: dict[str, Any]

    def _merged(self, st, row, hist, blocked, n_mine):
        out = super()._merged(st, row, hist, blocked, n_mine)
        self.last = {"tags": out[1]}
        return out

    def score(self, b, user_id, row, hist, rows, context):
        preds, watch = super().score(b, user_id, row, hist, rows, context)
        self.last["scored_rows"], self.last["preds"] = rows, preds
        return preds, watch

    def affinity(self, st, scenario, vec, rows):
        self.last["affinity"] = aff = super().affinity(st, scenario, vec, rows)
        return aff


def collect(bundle_dir: str, period: str, max_users: int, retrieved_only: bool = False) -> dict[str, Any]:
    bundle = load_bundle(bundle_dir, onnx_threads=2)
    log, view, _ = own_period(bundle, period, as_of)
    rec = _Capturing(view, served_settings(None, bundle))
    st = rec.state
    scenario = rec.scenario_name(st, None)
    weights = st.policy.weights[scenario]
    steps = rec.settings.policy.for_scenario(scenario)
    if st.policy.fusion_retrieval_weight(steps) <= 0:
        raise SystemExit(f"{bundle_dir}: its page gives the retrieval score no weight (the probe compares orders "
                         "against the bundle's weight); choose one first (python -m evaluation choose-channels)")
    mode = steps.fusion.mode
    log = log.sort_values("ts", kind="stable").assign(user_id=lambda d: d["user_id"].astype(str))
    log["row"] = log["item_id"].astype(str).map(view.item_row).fillna(-1).astype(np.int64)
    log = log[(log["row"] >= 0) & log["user_id"].isin(view.user_row.keys())]
    positives = log[log["long_view"] > 0].groupby("user_id")["row"].apply(lambda s: set(s.tolist()))
    users = [u for u in pd.unique(log["user_id"]) if u in positives.index][:max_users]
    first = log.drop_duplicates("user_id").set_index("user_id")
    ctx_names = [n for _, n in view.request_cat if n != "user_id" and n in log]
    ch = view.channels
    trend_rank, fresh_rank = ch.list_rank("trending"), ch.list_rank("fresh")
    X, y, n, npos = [], [], [], []
    for u in users:
        rec.recommend(u, K, None, context={c: str(first.at[u, c]) for c in ctx_names})
        c = rec.last
        rows = c["scored_rows"]
        tags = np.concatenate([c["tags"], np.full(len(rows) - len(c["tags"]), -1)])  # -1: exposure candidates
        keep = tags >= 0 if retrieved_only else np.ones(len(rows), bool)
        if c["affinity"] is None or keep.sum() < 2:  # the popular cold start: no retrieval score
            continue
        rows, tags, preds, aff = rows[keep], tags[keep], c["preds"][keep], c["affinity"][keep]
        fused = fuse(preds, weights, mode)
        hist = rec.user_lookup(view, u)[1]
        items, w = history_weights(hist)
        ok = items < len(view.idx_to_row)
        hrows, w = view.idx_to_row[items[ok]], w[ok]
        keep = hrows >= 0
        covisit = (np.asarray(ch.covisit[hrows[keep]].T @ w[keep]).reshape(-1)[rows] if keep.any()
                   else np.zeros(len(rows)))
        z = lambda v: (v - v.mean()) / (v.std() or 1.0)  # noqa: E731
        X.append(np.column_stack([z(fused), z(aff), np.log(np.clip(preds, 1e-6, 1.0)),
                                  np.log1p(trend_rank[rows]), np.log1p(fresh_rank[rows]), np.log1p(100 * covisit),
                                  *((tags == t) for t in range(-1, len(CHANNEL_REASONS) - 1))]).astype(np.float32))
        y.append(np.array([r in positives[u] for r in rows], np.float32))
        n.append(len(rows))
        npos.append(len(positives[u]))
    columns = (["fused_z", "retrieval_z", *(f"log_{h}" for h in view.heads), "trending_rank", "fresh_rank", "covisit"]
               + ["exposure_candidate", *(r.split(":")[1] for r in CHANNEL_REASONS[:-1])])
    return {"X": np.concatenate(X), "y": np.concatenate(y), "n": np.array(n), "npos": np.array(npos), "columns": columns,
            "page_retrieval_weight": float(st.policy.fusion_retrieval_weight(steps))}


def ndcg_per_user(score: np.ndarray, y: np.ndarray, off: np.ndarray, npos: np.ndarray, users: np.ndarray) -> np.ndarray:
    """NDCG@K of each user's candidates ordered by ``score``, the ideal being all the user's period positives."""
    out = np.empty(len(users))
    for j, g in enumerate(users):
        s, lab = score[off[g]:off[g + 1]], y[off[g]:off[g + 1]]
        top = np.argsort(-s, kind="stable")[:K]
        out[j] = ndcg(lab[top][None], np.ones((1, int(npos[g]))), K)[0]
    return out


def compare(d: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    import lightgbm as lgb
    from sklearn.linear_model import LogisticRegression

    X, y, n, npos = d["X"], d["y"], d["n"], d["npos"]
    off = np.concatenate([[0], np.cumsum(n)])
    fold = np.arange(len(n)) % 2
    order = np.concatenate([np.flatnonzero(fold == h) for h in (0, 1)])  # every order's users in this order
    rows_of = lambda users: np.concatenate([np.arange(off[g], off[g + 1]) for g in users])  # noqa: E731

    def cross_fitted(fit) -> np.ndarray:
        per = []
        for h in (0, 1):
            train = np.flatnonzero(fold != h)
            per.append(ndcg_per_user(fit(train), y, off, npos, np.flatnonzero(fold == h)))
        return np.concatenate(per)

    orders: dict[str, np.ndarray] = {}
    for w in sorted({0.0, 2.0, 8.0, 32.0, 1000.0, d["page_retrieval_weight"]}):
        orders[f"weight {w:g}"] = ndcg_per_user(X[:, 0] + w * X[:, 1], y, off, npos, order)
    at = {c: i for i, c in enumerate(d["columns"])}
    retrieval_side = [at[c] for c in ("fused_z", "retrieval_z", "trending_rank", "fresh_rank", "covisit")]
    for name, cols in (("logistic: two scores", [0, 1]), ("logistic: retrieval side", retrieval_side),
                       ("logistic: every signal", list(range(X.shape[1])))):
        orders[name] = cross_fitted(lambda tr, cols=cols: LogisticRegression(max_iter=2000).fit(
            X[rows_of(tr)][:, cols], y[rows_of(tr)]).decision_function(X[:, cols]))
    params = {"objective": "lambdarank", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 200,
              "lambdarank_truncation_level": K, "feature_fraction": 0.8, "verbose": -1, "seed": seed}
    orders["LambdaRank: every signal"] = cross_fitted(lambda tr: lgb.train(
        params, lgb.Dataset(X[rows_of(tr)], y[rows_of(tr)], group=n[tr]), 200).predict(X))
    # What the model over every signal leans on: its coefficients on standardised columns, fitted on every user.
    sd = X.std(axis=0)
    sd[sd == 0] = 1.0
    full = LogisticRegression(max_iter=2000).fit(X / sd, y)
    coefficients = {c: round(float(v), 3) for c, v in zip(d["columns"], full.coef_[0])}
    base_name = f"weight {d['page_retrieval_weight']:g}"
    base = orders[base_name]
    out = {"users": int(len(n)), "candidates_per_user": float(n.mean()), "baseline": base_name, "orders": {},
           "every_signal_coefficients": coefficients}
    for name, v in orders.items():
        diff = paired_difference(v, base, seed)
        out["orders"][name] = {f"ndcg@{K}_long_view": round(float(v.mean()), 5), "minus_baseline": diff}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="a held-out bundle (its period is served as of its start)")
    ap.add_argument("--period", default="valid", choices=["valid", "test"])
    ap.add_argument("--max-users", type=int, default=2000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--retrieved-only", action="store_true",
                    help="leave out the exposure step's candidates (the policy places those, not the order)")
    args = ap.parse_args()
    result = compare(collect(args.bundle, args.period, args.max_users, args.retrieved_only))
    print(f"{result['users']} users, {result['candidates_per_user']:.0f} candidates each; "
          f"NDCG@{K} long_view of the candidates' order (no feed policy), minus {result['baseline']}:")
    for name, m in result["orders"].items():
        d = m["minus_baseline"]
        print(f"  {name:26s} {m[f'ndcg@{K}_long_view']:.4f}  {d['difference']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
    print("logistic over every signal, standardised coefficients:",
          ", ".join(f"{c} {v:+.3f}" for c, v in result["every_signal_coefficients"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
