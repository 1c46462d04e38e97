"""The offline policy evaluation: production-like candidates, time order, the service's own page code, and
metrics that mean what they say, on the real bundle trained on the synthetic world."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.synthetic import World
from serving.bundle import Bundle, load_bundle
from serving.config import ServeSettings, ServingConfig
from serving.offline import BASELINE, POLICY, evaluate_policy, lorenz, ndcg, serve_arm
from serving.offline_cases import condensed, gain_names, period_log, period_view, prepare_cases
from serving.policy import fuse
from serving.policy_config import ExposureControl, ExposureStep, GovernanceConfig, PolicyConfig, QualityStep
from serving.recommender import Recommender

K = 10
USERS = 60


@pytest.fixture(scope="module")
def bundle(serving_bundle: Path) -> Bundle:
    if not (serving_bundle / "features" / "interactions.parquet").exists():
        pytest.skip("this bundle ships no interactions.parquet")
    return load_bundle(serving_bundle)


@pytest.fixture(scope="module")
def test_log(bundle: Bundle):
    return period_log(bundle, "test")


def test_policy_vs_engagement_only_report(bundle: Bundle):
    out = evaluate_policy(bundle, ServeSettings(ServingConfig(evaluation_gains=["long_view", "click"])), k=K,
                          max_users=USERS)
    assert out["users"] == USERS and out["data"]["period"] == "test"
    assert out["gains"] == ["long_view", "click", "weighted"]
    for arm in (POLICY, BASELINE):
        m = out[arm]
        assert m["governance_leaks"] == 0
        assert 0 <= m["creator_gini"] <= 1 and 0 < m["item_coverage"] <= 1 and 0 < m["creator_coverage"] <= 1
        for kind in ("judged", "dm", "union"):
            assert m[f"ndcg_{kind}@{K}_long_view"] is not None and 0 <= m[f"ndcg_{kind}@{K}_weighted"] <= 1
        assert m["slots"] == K * USERS and len(m["lorenz"]) == 101 and m["lorenz"][-1] == pytest.approx(1.0)
    assert set(out["relative_to_engagement_only"]) == {POLICY}
    calib = out["calibration_by_exposure"]
    assert sum(g["impressions"] for g in calib) == out["data"]["evaluated_impressions"]
    assert all(0 <= g["predicted_long_view"] <= 1 and 0 <= g["realised_long_view"] <= 1 for g in calib)
    rel = out["relative_to_engagement_only"][POLICY]
    for kind in ("judged", "dm"):
        worst = max(0.0, *(-rel[f"ndcg_{kind}@{K}_{g}"] for g in out["gains"]))
        assert rel[f"max_ndcg_loss_{kind}"] == pytest.approx(worst, abs=1e-4)
        fair = rel["creator_gini"] <= -0.25 and out[POLICY]["governance_leaks"] == 0
        assert rel[f"passes_bar_{kind}"] == (fair and worst <= 0.03)
    # Quality support as the only extra step: the high-quality share of slots can only go up.
    quality_only = PolicyConfig.engagement_only()
    quality_only.quality = QualityStep(min_share=0.9)
    q = evaluate_policy(bundle, ServeSettings(policy=quality_only), k=K, max_users=USERS)
    assert q[POLICY]["quality_share"] >= 0.9 > q[BASELINE]["quality_share"]


def test_candidates_are_retrieval_plus_logged_items_in_time_order(bundle: Bundle, test_log):
    view, note = period_view(bundle, test_log)
    assert note["users"] > 0 and note["items"] > 0
    rec = Recommender(view, ServeSettings(ServingConfig(candidates=50)))
    cases, report = prepare_cases(rec, test_log, max_users=USERS)
    assert report["evaluated_users"] == USERS
    first_ts = test_log.sort_values("ts").drop_duplicates("user_id").set_index("user_id")["ts"]
    ts = [first_ts[c.user_id] for c in cases]
    assert ts == sorted(ts)
    for c in cases:
        shown = {bundle.item_row[i] for i in test_log.loc[test_log["user_id"] == c.user_id, "item_id"]}
        assert set(c.rows[c.logged].tolist()) == shown
        assert len(set(c.rows.tolist())) == len(c.rows) >= min(50, bundle.n_items)
        assert not c.gains[~c.logged].any()
    # Scores are the service's own for the same user and rows.
    c = cases[0]
    row, hist = rec.user_lookup(view, c.user_id)
    np.testing.assert_array_equal(hist, c.hist)
    ctx = {n: str(test_log.sort_values("ts").loc[lambda d: d["user_id"] == c.user_id, n].iloc[0])
           for _, n in view.request_cat if n != "user_id" and n in test_log}
    np.testing.assert_allclose(rec.score(view, c.user_id, row, hist, c.rows, ctx)[0], c.preds, rtol=1e-6)


def test_period_view_uses_time_correct_history(bundle: Bundle, test_log):
    view, _ = period_view(bundle, test_log)
    first = test_log.sort_values("ts").drop_duplicates("user_id").iloc[0]
    row = bundle.user_row[str(first["user_id"])]
    np.testing.assert_array_equal(view.history[row], np.asarray(first["history"]))
    assert view.ranker is bundle.ranker and view.index is bundle.index


def test_governance_blocklist_from_the_world_never_leaks(bundle: Bundle, test_log, world: World):
    blocked = GovernanceConfig(blocked_items=list(world.blocked_items), blocked_creators=list(world.blocked_creators))
    assert blocked.blocked_items or blocked.blocked_creators
    # What a moderator would never want served, from the world's ground truth (and the bundle's visibility).
    forbidden = (np.isin(bundle.item_ids, world.blocked_items) | ~bundle.visible
                 | np.isin(bundle.creator_ids, world.blocked_creators)[bundle.item_creator])
    view, _ = period_view(bundle, test_log)
    # Exposure boosting lifts never-shown creators, the blocked one among them: governance has work to do.
    control, strong = ExposureControl(update_every=5, initial_boost=8.0), ExposureStep(strength=5.0)
    governed = PolicyConfig(governance=blocked, exposure_control=control, exposure=strong)
    arms = {"open": PolicyConfig(exposure_control=control, exposure=strong),
            BASELINE: PolicyConfig.engagement_only(governed), POLICY: governed}
    recs = {a: Recommender(view, ServeSettings(policy=cfg)) for a, cfg in arms.items()}
    cases, _ = prepare_cases(recs[POLICY], test_log, max_users=USERS)
    leaks = {arm: serve_arm(rec, cases, K, forbidden=forbidden)[0]["governance_leaks"] for arm, rec in recs.items()}
    assert leaks["open"] > 0, leaks  # without the blocklist these pages would serve blocked items
    assert leaks[BASELINE] == 0 and leaks[POLICY] == 0, leaks
    # The evaluator's own leak count (from the config) agrees.
    assert serve_arm(Recommender(view, ServeSettings(policy=governed)), cases, K)[0]["governance_leaks"] == 0
    assert PolicyConfig.engagement_only(governed).governance == blocked


def test_exposure_tracker_follows_the_run_and_the_policy_spreads_exposure(bundle: Bundle, test_log):
    view, _ = period_view(bundle, test_log)
    cfg = PolicyConfig()
    cfg.exposure_control.update_every = 5
    base, pol = (Recommender(view, ServeSettings(policy=c)) for c in (PolicyConfig.engagement_only(cfg), cfg))
    cases, _ = prepare_cases(pol, test_log, max_users=USERS)
    mb, *_ = serve_arm(base, cases, K)
    mp, *_ = serve_arm(pol, cases, K)
    assert pol.exposure.pages == USERS and base.exposure.pages == USERS
    assert mp["creator_gini"] < mb["creator_gini"]
    assert mp["reason_share"].get("exposure_boost", 0) > 0 and "exposure_boost" not in mb["reason_share"]


def test_ndcg_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, k = int(rng.integers(1, 30)), int(rng.integers(1, 12))
        gains = (rng.random((n, 2)) < 0.3) * rng.integers(1, 4, (n, 2))
        page = rng.permutation(n)[: min(n, k)]
        got = ndcg(gains[page].astype(float), gains.astype(float), k)
        for j in range(2):
            dcg = sum(gains[i, j] / np.log2(p + 2) for p, i in enumerate(page[:k]))
            ideal = sorted(gains[:, j], reverse=True)[:k]
            idcg = sum(g / np.log2(p + 2) for p, g in enumerate(ideal))
            if idcg == 0:
                assert np.isnan(got[j])
            else:
                assert got[j] == pytest.approx(dcg / idcg)


def test_lorenz_curve_ends():
    assert lorenz([1, 1, 1, 1], 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lorenz([0, 0, 0, 4], 3)[1] == 0.0


def test_condensed_list_keeps_page_order_then_fused_order():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        judged = rng.random(n) < 0.3
        fused = rng.random(n)
        page = rng.permutation(n)[: int(rng.integers(0, n + 1))]
        got = condensed(page, judged, fused).tolist()
        expect = [i for i in page.tolist() if judged[i]]
        expect += sorted((i for i in range(n) if judged[i] and i not in set(page.tolist())), key=lambda i: -fused[i])
        assert got == expect


def test_engagement_metrics_against_plain_computations(bundle: Bundle, test_log):
    """Engagement-only serves the top k by fused score, so its judged NDCG is the judged items' NDCG in
    fused order and its DM NDCG uses real labels on logged items, calibrated predictions elsewhere. A
    policy that forces under-exposed creators onto the page pays for it in DM NDCG."""
    view, _ = period_view(bundle, test_log)
    base = Recommender(view, ServeSettings(policy=PolicyConfig.engagement_only()))
    cases, _ = prepare_cases(base, test_log, max_users=USERS)
    mb, *_ = serve_arm(base, cases, K)
    st = base.state
    w = st.policy.weights[base.scenario_name(st, None)]
    judged_scores, dm_scores = [], []
    for c in cases:
        fused = fuse(c.preds, w)
        ok = st.servable[c.rows]
        order = np.flatnonzero(ok)[np.argsort(-fused[ok], kind="stable")]
        j = order[c.logged[order]]
        judged_scores.append(ndcg(c.gains[j], c.gains[j], K))
        dm = np.where(c.logged[:, None], c.gains, c.est)
        dm_scores.append(ndcg(dm[order[:K]], dm[ok], K))
    for j, g in enumerate(gain_names(base)):
        assert mb[f"ndcg_judged@{K}_{g}"] == pytest.approx(np.nanmean(np.array(judged_scores)[:, j]), abs=1e-5)
        assert mb[f"ndcg_dm@{K}_{g}"] == pytest.approx(np.nanmean(np.array(dm_scores)[:, j]), abs=1e-5)
    # Estimates are the calibrated heads: long_view's estimate is the long_view head itself.
    c = cases[0]
    np.testing.assert_allclose(c.est[:, 0], c.preds[:, bundle.heads.index("long_view")], rtol=1e-6)
    forced = PolicyConfig(exposure_control=ExposureControl(update_every=1, initial_boost=8.0),
                          exposure=ExposureStep(strength=20.0))
    mp, *_ = serve_arm(Recommender(view, ServeSettings(policy=forced)), cases, K)
    assert mp["reason_share"].get("exposure_boost", 0) > 0.2
    assert mp[f"ndcg_dm@{K}_weighted"] < mb[f"ndcg_dm@{K}_weighted"]
