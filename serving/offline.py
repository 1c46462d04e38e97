"""Offline evaluation of the feed policy with the code the service runs, on a held-out period or a later log.

    python -m serving.offline --bundle runs/full/heldout-bundle [--period valid|test] [--k 20] [--out policy.json]
    python -m training evaluate-policy --bundle runs/full/heldout-bundle [--log LATER.csv] --out policy.json   # + MLflow, plot

Protocol (every number of one run comes from this; keep it so runs compare):

* **Impressions.** Either the bundle's own ``features/interactions.parquet`` rows of one period
  (``test`` by default, ``valid`` for tuning), or a later log in the dataset's raw layout (read by the
  training CLI with the bundle's stored config). Only users and items the bundle knows are kept (a
  counted report says how many were not).
* **Features as of the period start.** The bundle's tables are the serving snapshot taken at the end of
  its data, which *includes* its valid and test periods. For its own period the evaluator therefore
  serves from a *period view* of the bundle: each evaluated user's history, the quality aggregates of the
  items shown in the period and the user's fan relations to those items' creators are replaced by the
  time-correct values stored on the user's first period row (computed from data before the period).
  Residual look-ahead, the same in every arm: items with no impression in the period keep their snapshot
  aggregates, the high-quality creator flag and fan relations of pairs absent from the period keep their
  snapshot values. Retrieval's own inputs (the MF factors and popularity prior in the item vectors, the
  channel tables) are also built from every row of the bundle; ``python -m evaluation policy`` rebuilds
  them from the rows before the period (``evaluation.as_of``, reported under ``data.as_of``), this
  module's own CLI serves them as shipped. With ``--log`` the snapshot is exactly what serving would have
  used: no view.
* **Candidates as production sees them.** For each user: the FAISS top-``serving.candidates`` (500) of the
  bundle's user tower, united with the items the user was shown in the period (so that items with real
  feedback compete), ranked by the bundle's ONNX ranker with the context (tab, hour) of the user's first
  period impression. Retrieval and ranking run once per user and are shared by every arm; an arm with
  ``exposure.candidate_slots`` > 0 adds its exposure candidates (from its own tracker) per page, ranked alike.
* **One page per user, in time order.** Users are served in the order of their first period impression;
  each arm (engagement-only = governance + fusion + top-k; the configured policy; any extra configs) has
  its own :class:`~serving.recommender.Recommender` and so its own exposure tracker, starting empty and
  evolving page by page as in production. Pages are built by ``Recommender.candidates`` and
  ``FeedPolicy.page``, the calls ``Recommender.recommend`` makes.
* **Engagement.** Gains per candidate: the binary signals of ``serving.evaluation_gains`` (KuaiRand:
  ``long_view``, ``click``; empty = the retrieval positive signal; the first is the *primary* gain), and
  ``weighted`` = max(0, sum of the scenario's fusion weights over the binary signals). Only a few candidates per user carry a logged label
  (the user's period impressions), so NDCG@k is reported three ways:

  - ``ndcg_judged``: real signals only. The arm's ranking *condensed* to the judged (logged) items: those
    on the page in page order, then the others by fused score (the same in every arm); unlogged items are
    removed, not scored 0 (Sakai's condensed lists for incomplete judgments). It shows whether a policy
    demotes items users liked below items they did not; it cannot see what displaced items were worth.
  - ``ndcg_dm``: the direct method with real labels where they exist. A logged candidate gains its real
    outcome, any other its calibrated ranker prediction (``weighted``: the fused predictions); the ideal is
    the best k over all servable candidates. It charges a policy for every relevant item it displaces,
    and leans on calibration, which ``calibration_logged_slots`` checks on the page (mean predicted vs
    realised primary-gain rate of served logged items).
    ``calibration_by_exposure`` splits that check by how much engagement-only exposed the item's creator:
    if the model under-rated the creators a policy promotes, DM would overstate the policy's cost.
  - ``ndcg_union``: logged labels, 0 for unlogged items. **Biased**: a policy that serves more of what
    the logging system happened to show scores higher (tail creators were logged more often than
    retrieval finds them). Kept as a diagnostic, never in the bar.

  The bar (<= 3% loss over all gains) is checked on each: ``passes_bar_judged`` (real signals only) and
  ``passes_bar_dm``. Users without a positive (judged, union) or with an all-zero ideal (dm) are skipped
  for that gain.
* **Exposure.** One count per page slot, summed over the run (no decay). ``creator_gini`` (the headline)
  and its Lorenz curve are taken over one population shared by every arm of the run: the creators with a
  servable candidate for some user in *any* arm (zeros included: who the feed could have reached), so
  arms that add candidates are not compared on a larger population. ``creator_gini_attention`` weighs each
  slot by the NDCG position discount 1/log2(1 + position) (exposure as attention: a policy cannot lower it
  by parking boosted items at the bottom of the page). Also reported: over the arm's own
  candidate creators, over *served creators* (exposure > 0 only) and over the *catalogue* (every creator
  with a servable item).
* **Coverage**: distinct served items / distinct servable candidates, and the same for creators.
  **Quality share**: share of page slots from high-quality creators. **Fan delivery**: among pages whose
  candidates held a servable fresh item of a creator the user is an iron fan of (fans-first's own test,
  whatever the arm's config), the share that served one. **Governance leaks**: served items that are not
  visible or are blocked (item or creator) by the configured governance, checked against the bundle and
  the config directly, not through the service's mask.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pandas as pd

from features.cli_common import user_count
from features.metrics import ndcg as shared_ndcg
from features.metrics import position_discount
from serving.bundle import Bundle, load_bundle
from serving.config import ServeSettings, load_settings
from serving.exposure import gini
from serving.offline_cases import (UserCase, condensed, estimated_gains, gain_names, own_period,
                                   prepare_cases)
from serving.policy import fuse
from serving.policy_config import PolicyConfig
from serving.recommender import Recommender

BASELINE = "engagement_only"
POLICY = "policy"
NDCG_KINDS = ("judged", "dm", "union")  # see the module docstring


# --------------------------------------------------------------------------- small metrics


def lorenz(x: np.ndarray, points: int = 11) -> list[float]:
    """Share of exposure held by the least-exposed fraction q of creators, q = 0, 1/(points-1), ..., 1."""
    v = np.sort(np.asarray(x, np.float64))
    if v.sum() <= 0:
        return [0.0] * points
    cum = np.r_[0.0, np.cumsum(v) / v.sum()]
    q = np.linspace(0, 1, points)
    return [round(float(np.interp(p * len(v), np.arange(len(v) + 1), cum)), 4) for p in q]


def ndcg(page_gains: np.ndarray, ideal_gains: np.ndarray, k: int) -> np.ndarray:
    """page_gains (k', G) gains of the served page in order, ideal_gains (m, G) -> (G,) NDCG@k (NaN: no positive)."""
    return shared_ndcg(np.asarray(page_gains).T, np.asarray(ideal_gains).T, k)


# --------------------------------------------------------------------------- one arm


def _forbidden(bundle: Bundle, policy: PolicyConfig) -> np.ndarray:
    """(N,) bool: what governance must never serve, from the bundle and the config directly."""
    bad = ~bundle.visible.astype(bool)
    bad |= np.isin(bundle.item_ids, list(policy.governance.blocked_items))
    bad |= np.isin(bundle.creator_ids, list(policy.governance.blocked_creators))[bundle.item_creator]
    return bad


def population_metrics(exposure: np.ndarray, attention: np.ndarray, population: np.ndarray) -> dict[str, Any]:
    """Exposure concentration over the creators in ``population`` (bool (C,)), zeros included."""
    e = exposure[population]
    return {"creator_gini": round(gini(e), 4), "creator_gini_attention": round(gini(attention[population]), 4),
            "top1pct_creator_share": round(float(np.sort(e)[::-1][: max(1, int(0.01 * len(e)))].sum()
                                                 / max(1.0, e.sum())), 4),
            "lorenz": lorenz(e, 101)}


class ArmRun(NamedTuple):
    metrics: dict[str, Any]
    exposure: np.ndarray  # (C,) page slots per creator
    reachable: np.ndarray  # (C,) bool the creator had a servable candidate
    attention: np.ndarray  # (C,) slots weighted by the position discount


class _ArmTally:
    """What one arm served, page by page: NDCG per kind, creator exposure, coverage, policy outcomes."""

    def __init__(self, b: Bundle, k: int, forbidden: np.ndarray):
        self.b, self.k, self.forbidden = b, k, forbidden
        n_creators = len(b.creator_ids)
        self.exposure = np.zeros(n_creators)
        self.attention = np.zeros(n_creators)  # exposure weighted by the NDCG position discount
        self.disc = position_discount(k)
        self.reachable = np.zeros(n_creators, bool)
        self.served_items = np.zeros(b.n_items, bool)
        self.candidate_items = np.zeros(b.n_items, bool)
        self.scores: dict[str, list[np.ndarray]] = {kind: [] for kind in NDCG_KINDS}
        self.slots = self.hq_slots = self.leaks = self.fan_possible = self.fan_served = 0
        self.logged_slots = self.positive_slots = self.appended_positive_slots = 0
        self.predicted_logged = 0.0
        self.reasons: dict[str, int] = {}
        self.pages = 0

    def add(self, c: UserCase, cands: Any, page: Any, fused: np.ndarray) -> None:
        b, k = self.b, self.k
        sel = c.rows[page.index]
        allowed = cands.allowed
        judged = allowed & c.logged
        dm = np.where(c.logged[:, None], c.gains, c.est)
        self.scores["judged"].append(ndcg(c.gains[condensed(page.index, judged, fused)], c.gains[judged], k))
        self.scores["dm"].append(ndcg(dm[page.index], dm[allowed], k))
        self.scores["union"].append(ndcg(c.gains[page.index], c.gains[judged], k))
        self.reachable[cands.creator[allowed]] = True
        self.candidate_items[c.rows[allowed]] = True
        self.served_items[sel] = True
        np.add.at(self.exposure, b.item_creator[sel], 1.0)
        np.add.at(self.attention, b.item_creator[sel], self.disc[: len(sel)])
        self.slots += len(sel)
        self.hq_slots += int(b.high_quality[sel].sum())
        self.leaks += int(self.forbidden[sel].sum())
        if (c.fan_fresh & allowed).any():
            self.fan_possible += 1
            self.fan_served += bool(c.fan_fresh[page.index].any())
        on_page_logged = c.logged[page.index]
        pos = c.gains[page.index, 0] > 0
        self.logged_slots += int(on_page_logged.sum())
        self.predicted_logged += float(c.est[page.index[on_page_logged], 0].sum())
        self.positive_slots += int(pos.sum())
        self.appended_positive_slots += int((pos & (page.index >= c.retrieved)).sum())
        for tags in page.reasons:
            for t in tags:
                self.reasons[t] = self.reasons.get(t, 0) + 1
        self.pages += 1

    def summary(self, gains: tuple[str, ...], servable: np.ndarray) -> dict[str, Any]:
        k, slots, primary = self.k, self.slots, gains[0]
        exposure, reachable = self.exposure, self.reachable
        nd = {kind: np.array(v).reshape(-1, len(gains)) for kind, v in self.scores.items()}
        catalogue = np.zeros(len(exposure), bool)
        catalogue[self.b.item_creator[servable]] = True
        served_creators = exposure > 0
        logged = self.logged_slots
        return {
            **{f"ndcg_{kind}@{k}_{g}": round(float(np.nanmean(v[:, j])), 5) if np.isfinite(v[:, j]).any() else None
               for kind, v in nd.items() for j, g in enumerate(gains)},
            **{f"ndcg_users_{kind}_{g}": int(np.isfinite(v[:, j]).sum())
               for kind, v in nd.items() for j, g in enumerate(gains)},
            # Over this arm's own candidate creators; evaluate_policy replaces them with the shared population's.
            **population_metrics(exposure, self.attention, reachable),
            "creator_gini_own_candidates": round(gini(exposure[reachable]), 4),
            "creator_gini_served": round(gini(exposure[served_creators]), 4),
            "creator_gini_catalogue": round(gini(exposure[catalogue]), 4),
            "item_coverage": round(int(self.served_items.sum()) / max(1, int(self.candidate_items.sum())), 4),
            "creator_coverage": round(int(served_creators.sum()) / max(1, int(reachable.sum())), 4),
            "served_items": int(self.served_items.sum()), "candidate_items": int(self.candidate_items.sum()),
            "served_creators": int(served_creators.sum()), "creators_with_candidates": int(reachable.sum()),
            "quality_share": round(self.hq_slots / slots, 4) if slots else None,
            "fan_delivery": round(self.fan_served / self.fan_possible, 4) if self.fan_possible else None,
            "fan_pages_possible": self.fan_possible,
            "governance_leaks": self.leaks,
            # Selection-bias check: served slots that had a logged impression, the primary gain's rate among
            # them, and the share of its positive slots that retrieval alone would not have offered.
            "logged_slot_share": round(logged / max(1, slots), 4),
            f"{primary}_rate_of_logged_slots": round(self.positive_slots / logged, 4) if logged else None,
            "calibration_logged_slots": ({f"predicted_{primary}": round(self.predicted_logged / logged, 4),
                                          f"realised_{primary}": round(self.positive_slots / logged, 4)}
                                         if logged else None),
            f"{primary}_slots_from_appended": (round(self.appended_positive_slots / self.positive_slots, 4)
                                               if self.positive_slots else None),
            "pages": self.pages, "slots": slots,
            "reason_share": {t: round(n / max(1, slots), 4) for t, n in sorted(self.reasons.items())},
        }


def _with_exposure_candidates(rec: Recommender, st: Any, c: UserCase, scenario: str) -> tuple[UserCase, int]:
    """``c`` plus this arm's exposure candidates, ranked; the step depends on the arm's own tracker, so it
    runs here, not in prepare_cases (no logged impression: every logged item is already among the rows)."""
    extra = rec.exposure_candidates(st, c.vec, c.rows, scenario)
    if not len(extra):
        return c, 0
    xp, _ = rec.score(st.bundle, c.user_id, c.row, c.hist, extra, c.context)
    return dataclasses.replace(
        c, rows=np.concatenate([c.rows, extra]), preds=np.concatenate([c.preds, xp]),
        gains=np.concatenate([c.gains, np.zeros((len(extra), c.gains.shape[1]), c.gains.dtype)]),
        est=np.concatenate([c.est, estimated_gains(xp, *c.est_spec)]),
        logged=np.r_[c.logged, np.zeros(len(extra), bool)], fan_fresh=np.r_[c.fan_fresh, np.zeros(len(extra), bool)],
    ), len(extra)


def serve_arm(rec: Recommender, cases: list[UserCase], k: int, scenario: str | None = None,
              forbidden: np.ndarray | None = None) -> "ArmRun":
    """Serve every case in order through ``rec`` (its tracker evolves).

    ``forbidden`` (N,) bool: catalogue rows counted as governance leaks when served (default: not visible
    or blocked by ``rec``'s governance config).
    """
    st = rec.state
    b = st.bundle
    name = rec.scenario_name(st, scenario)
    gains = gain_names(rec)
    tally = _ArmTally(b, k, _forbidden(b, rec.settings.policy) if forbidden is None else forbidden)
    steps = st.policy.config.for_scenario(name)
    t0 = time.perf_counter()
    for c in cases:
        c, n_extra = _with_exposure_candidates(rec, st, c, name)
        cands = rec.candidates(st, c.row, c.hist, c.rows, c.preds, name, None)
        if n_extra:
            cands.exposure_pool = np.arange(len(c.rows)) >= len(c.rows) - n_extra
        cands.affinity = rec.affinity(st, name, c.vec, c.rows)
        page = st.policy.page(cands, k, name, rec.exposure)
        tally.add(c, cands, page, fuse(c.preds, st.policy.weights[name], steps.fusion.mode))
    seconds = time.perf_counter() - t0
    out = {
        **tally.summary(gains, st.servable),
        "tracker": {"boost": round(float(rec.exposure.boost), 4), "gini": round(float(rec.exposure.current_gini), 4)},
        "policy_ms_per_page": round(1e3 * seconds / max(1, len(cases)), 3),
    }
    return ArmRun(out, tally.exposure, tally.reachable, tally.attention)


# --------------------------------------------------------------------------- the whole evaluation


def evaluate_policy(bundle: Bundle, settings: ServeSettings, k: int = 20, *, log: pd.DataFrame | None = None,
                    period: str = "test", scenario: str | None = None, max_users: int | None = None,
                    extra: dict[str, PolicyConfig] | None = None, source: str | None = None,
                    retrieval_as_of: Callable[[Bundle, Bundle, int], tuple[Bundle, dict[str, Any]]] | None = None,
                    ) -> dict[str, Any]:
    """Engagement-only vs ``settings.policy`` (and ``extra`` named configs) on one period or later log.

    ``log``: canonical impressions of a later log (user_id, item_id, ts, signals, context); when None the
    bundle's own ``period`` rows are used, served from :func:`period_view`, then through
    ``retrieval_as_of(bundle, view, period start)`` when given (what retrieval knows rebuilt from the rows
    before the period: ``evaluation.as_of``, which needs the training code, so it is passed in).
    """
    t0 = time.perf_counter()
    if log is None:
        log, view, data = own_period(bundle, period, retrieval_as_of)
    else:
        view = bundle
        data = {"source": source or "later log", "period": None, "period_view": None}
    configs = {BASELINE: PolicyConfig.engagement_only(settings.policy), POLICY: settings.policy, **(extra or {})}
    recs = {arm: Recommender(view, ServeSettings(settings.serving, cfg)) for arm, cfg in configs.items()}
    probe_cfg = dataclasses.replace(settings.policy, fans_first=dataclasses.replace(settings.policy.fans_first, enabled=True))
    probe = Recommender(view, ServeSettings(settings.serving, probe_cfg))
    cases, report = prepare_cases(recs[POLICY], log, scenario, max_users, probe)
    data.update(report, notes=bundle.data_notes())
    if log is not None and len(log):
        data["time_range"] = [int(log["ts"].min()), int(log["ts"].max())]
    t1 = time.perf_counter()
    gains = gain_names(recs[POLICY])
    out: dict[str, Any] = {"protocol": "serving.offline (see its docstring)", "k": k, "gains": list(gains),
                           "scenario": recs[POLICY].scenario_name(recs[POLICY].state, scenario),
                           "candidates": settings.serving.candidates, "data": data, "users": len(cases)}
    exposure: dict[str, np.ndarray] = {}
    attention: dict[str, np.ndarray] = {}
    reachable = np.zeros(len(bundle.creator_ids), bool)
    for arm, rec in recs.items():
        run = serve_arm(rec, cases, k, scenario)
        out[arm], exposure[arm], attention[arm] = run.metrics, run.exposure, run.attention
        reachable |= run.reachable
    for arm in recs:  # one creator population for every arm
        out[arm].update(population_metrics(exposure[arm], attention[arm], reachable))
    out["creator_population"] = int(reachable.sum())
    out["calibration_by_exposure"] = calibration_by_exposure(cases, bundle.item_creator, exposure[BASELINE], gains[0])
    base = out[BASELINE]
    rel: dict[str, Any] = {}
    for arm in recs:
        if arm == BASELINE:
            continue
        r = {"creator_gini": _rel(out[arm]["creator_gini"], base["creator_gini"]),
             "creator_gini_attention": _rel(out[arm]["creator_gini_attention"], base["creator_gini_attention"]),
             "creator_gini_catalogue": _rel(out[arm]["creator_gini_catalogue"], base["creator_gini_catalogue"])}
        for kind in NDCG_KINDS:
            for g in gains:
                key = f"ndcg_{kind}@{k}_{g}"
                r[key] = _rel(out[arm][key], base[key])
        fair = (r["creator_gini"] is not None and r["creator_gini"] <= -0.25 and out[arm]["governance_leaks"] == 0)
        for kind in ("judged", "dm"):
            loss = max(0.0, *(-(r[f"ndcg_{kind}@{k}_{g}"] or 0.0) for g in gains))
            r[f"max_ndcg_loss_{kind}"] = round(loss, 4)
            r[f"passes_bar_{kind}"] = bool(fair and loss <= 0.03)
        rel[arm] = r
    out["relative_to_engagement_only"] = rel
    out["bar"] = {"gini_reduction_at_least": 0.25, "ndcg_loss_at_most": 0.03, "governance_leaks": 0,
                  "note": "passes_bar_judged: real signals only; passes_bar_dm: real signals + calibrated "
                          "predictions for unlogged slots (the stricter reading)"}
    out["seconds"] = {"retrieve_and_rank": round(t1 - t0, 1), "total": round(time.perf_counter() - t0, 1)}
    return out


def calibration_by_exposure(cases: list[UserCase], item_creator: np.ndarray, exposure: np.ndarray,
                            primary: str) -> list[dict[str, Any]]:
    """Predicted vs realised rate of the primary gain (``primary``) of every logged impression, by how much the engagement-only
    arm exposed its creator: does the model under- or over-rate the creators a fairness policy promotes?
    (The DM NDCG leans on exactly this.)"""
    pred, real, tier = [], [], []
    for c in cases:
        lg = np.flatnonzero(c.logged)
        pred.append(c.est[lg, 0])
        real.append(c.gains[lg, 0])
        tier.append(exposure[item_creator[c.rows[lg]]])
    if not pred:
        return []
    p, r, t = np.concatenate(pred), np.concatenate(real), np.concatenate(tier)
    med = float(np.median(t[t > 0])) if (t > 0).any() else 0.0
    groups = [("not served by engagement-only", t == 0), (f"served, <= {med:g} slots", (t > 0) & (t <= med)),
              (f"served, > {med:g} slots", t > med)]
    return [{"creators": name, "impressions": int(m.sum()), f"predicted_{primary}": round(float(p[m].mean()), 4),
             f"realised_{primary}": round(float(r[m].mean()), 4),
             "realised_over_predicted": round(float(r[m].mean() / max(p[m].mean(), 1e-9)), 3)}
            for name, m in groups if m.any()]


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round((a - b) / b, 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.offline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--config", default=None, help="YAML with serving: / policy: (default: the bundle's recipe)")
    ap.add_argument("--period", choices=("valid", "test"), default="test")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--scenario", default=None)
    ap.add_argument("--max-users", type=user_count, default=None, help="the first N users (time order); 0 = all")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    bundle = load_bundle(args.bundle)
    result = evaluate_policy(bundle, load_settings(args.config, bundle.manifest.config), args.k, period=args.period,
                             scenario=args.scenario, max_users=args.max_users)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
