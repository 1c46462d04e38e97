"""The feed policy on the synthetic world, where the truth is known: each step does what it claims.

Candidates come from the world's ground truth (true click / long-view / hate probabilities from latent
interest and quality), so the tests do not depend on a trained model.
"""

from __future__ import annotations

import numpy as np
import pytest

from features.config import ConfigError
from features.synthetic import World
from serving.exposure import ExposureTracker, creator_groups, gini, least_exposed_pool
from serving.policy import Candidates, FeedPolicy, fuse
from serving.policy_config import (
    DiversityStep, ExplorationStep, ExposureControl, ExposureStep, FansFirstStep, PolicyConfig, QualityStep, load_policy,
)

HEADS = ["click", "long_view", "hate"]
SCENARIOS = {"feed": {"click": 1.0, "long_view": 2.0, "hate": -30.0}, "commerce": {"click": 2.0, "hate": -30.0}}
K = 20


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def truth_candidates(world: World, user: int, hq_quantile: float = 0.8, blocked_creators: tuple[int, ...] = ()) -> Candidates:
    """Every item of the world as a candidate for ``user``, with its true head probabilities."""
    aff = 4.0 * world.user_interest[user, world.item_topic] + 0.8 * world.item_quality - 0.6
    click = _sigmoid(aff)
    preds = np.stack([click, click * _sigmoid(aff - 1.0), _sigmoid(-1.5 * world.item_quality - 4.5)], axis=1)
    creator = world.item_creator.astype(np.int64)
    hq_creators = world.creator_quality >= np.quantile(world.creator_quality, hq_quantile)
    follows = np.array(sorted(c for u, c in world.follows if u == user), dtype=np.int64)
    top_topic = int(np.argmax(world.user_interest[user]))
    return Candidates(
        creator=creator, category=world.item_topic.astype(np.int64), preds=preds.astype(np.float32),
        allowed=world.item_visible & ~np.isin(creator, blocked_creators),
        high_quality=hq_creators[creator], fan_fresh=np.isin(creator, follows),
        new_category=world.item_topic != top_topic,
    )


def only(**steps) -> PolicyConfig:
    """Engagement-only config with the named steps switched back on."""
    cfg = PolicyConfig.engagement_only()
    for name, step in steps.items():
        setattr(cfg, name, step)
    return cfg


def fans_user(world: World) -> int:
    counts = np.bincount([u for u, _ in world.follows], minlength=world.spec.n_users)
    return int(np.argmax(counts))


# --------------------------------------------------------------------------- math


def test_gini_matches_mean_absolute_difference_definition():
    rng = np.random.default_rng(0)
    for x in (rng.random(7), rng.pareto(1.5, 50), np.ones(10), np.r_[np.zeros(9), 1.0]):
        loop = sum(abs(a - b) for a in x for b in x) / (2 * len(x) ** 2 * x.mean())
        assert gini(x) == pytest.approx(loop, abs=1e-9)
    assert gini(np.zeros(5)) == 0.0


def test_fuse_sum_and_product_match_a_plain_loop():
    rng = np.random.default_rng(1)
    p, w = rng.random((30, 3)).astype(np.float32), np.array([1.0, 2.0, -30.0], np.float32)
    loop = [sum(p[i, j] * w[j] for j in range(3)) for i in range(30)]
    np.testing.assert_allclose(fuse(p, w, "sum"), loop, rtol=1e-5)
    prod = [np.prod([max(p[i, j], 1e-6) ** w[j] for j in range(3)]) for i in range(30)]
    np.testing.assert_allclose(fuse(p, w, "product"), prod, rtol=1e-4)


def test_exposure_decays_with_the_configured_half_life():
    t = ExposureTracker(3, ExposureControl(half_life_pages=10, update_every=1000))
    t.record(np.array([0]))
    for _ in range(10):
        t.record(np.array([2]))
    assert t.exposure()[0] == pytest.approx(0.5, rel=1e-9)
    assert t.exposure()[1] == 0


def test_least_exposed_pool_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    n_items, n_creators = 400, 60
    item_creator = rng.integers(0, n_creators, n_items)
    servable = rng.random(n_items) > 0.2
    groups = creator_groups(servable, item_creator, n_creators)
    for size, per_creator in ((25, 1), (70, 3), (10_000, 2)):
        t = ExposureTracker(n_creators, ExposureControl(update_every=1000, pool_size=size, pool_per_creator=per_creator))
        for _ in range(300):
            t.record(rng.integers(0, n_creators, 5) ** 2 % n_creators)  # skewed: some creators far above the mean
        e, mean = t.exposure(), t.mean_exposure()
        want = []
        for c in sorted(range(n_creators), key=lambda c: (e[c], c)):
            mine = [r for r in range(n_items) if servable[r] and item_creator[r] == c][:per_creator]
            if mine and e[c] < mean and len(want) < size:
                want += mine
        assert least_exposed_pool(t, groups).tolist() == want[:size]


# --------------------------------------------------------------------------- steps


def test_governance_never_serves_blocked_or_invisible_items(world: World):
    pol = FeedPolicy(PolicyConfig(), HEADS, SCENARIOS)
    tracker = ExposureTracker(world.spec.n_creators, ExposureControl(update_every=5))
    blocked = (int(world.item_creator[0]), int(world.item_creator[1]))
    for user in range(0, world.spec.n_users, 3):
        c = truth_candidates(world, user, blocked_creators=blocked)
        page = pol.page(c, K, "feed", tracker)
        assert len(page.index) == K
        assert world.item_visible[page.index].all()
        assert not np.isin(world.item_creator[page.index], blocked).any()


def test_fusion_ranks_by_weighted_heads_and_hate_pulls_down(world: World):
    pol = FeedPolicy(PolicyConfig.engagement_only(), HEADS, SCENARIOS)
    c = truth_candidates(world, 0)
    page = pol.page(c, K, "feed")
    fused = fuse(c.preds, pol.weights["feed"])
    best = np.argsort(-np.where(c.allowed, fused, -np.inf), kind="stable")[:K]
    np.testing.assert_array_equal(page.index, best)
    assert all(r == ["relevance"] for r in page.reasons)
    # Same click / long-view, more hate -> lower score.
    p = np.array([[0.5, 0.3, 0.001], [0.5, 0.3, 0.05]], np.float32)
    s = fuse(p, pol.weights["feed"])
    assert s[1] < s[0]


def test_the_retrieval_score_joins_the_fusion_in_units_of_the_fused_spread(world: World):
    """policy.fusion.retrieval_weight w: the page orders by fused + w * std(fused) * z(affinity) over the allowed
    candidates (a plain loop here); w = 0 or no affinity leaves the ranker's order; the bundle's weight
    applies where the policy leaves it null; a negative weight is refused."""
    c = truth_candidates(world, 0)
    rng = np.random.default_rng(3)
    c.affinity = rng.normal(size=len(c.allowed)).astype(np.float32)
    base = FeedPolicy(PolicyConfig.engagement_only(), HEADS, SCENARIOS)
    fused = fuse(c.preds, base.weights["feed"])
    keep = np.flatnonzero(c.allowed)
    for w in (0.5, 3.0):
        cfg = PolicyConfig.engagement_only()
        cfg.fusion.retrieval_weight = w
        page = FeedPolicy(cfg, HEADS, SCENARIOS).page(c, K, "feed")
        f, a = fused[keep].astype(np.float64), c.affinity[keep].astype(np.float64)
        loop = [f[i] + w * f.std() * (a[i] - a.mean()) / a.std() for i in range(len(keep))]
        np.testing.assert_array_equal(page.index, keep[np.argsort(-np.array(loop), kind="stable")[:K]])
    ranker_only = base.page(c, K, "feed").index
    assert not np.array_equal(page.index, ranker_only)  # the weight really moved the page
    bundle_choice = FeedPolicy(PolicyConfig.engagement_only(), HEADS, SCENARIOS, retrieval_weight=3.0)
    np.testing.assert_array_equal(bundle_choice.page(c, K, "feed").index, page.index)
    cfg = PolicyConfig.engagement_only()
    cfg.fusion.retrieval_weight = 0.0  # the policy's 0 overrides the bundle's choice
    np.testing.assert_array_equal(FeedPolicy(cfg, HEADS, SCENARIOS, 3.0).page(c, K, "feed").index, ranker_only)
    c.affinity = None
    np.testing.assert_array_equal(bundle_choice.page(c, K, "feed").index, ranker_only)
    with pytest.raises(ConfigError, match="retrieval_weight"):
        load_policy({"fusion": {"retrieval_weight": -1.0}})


def test_fans_first_puts_fresh_items_of_iron_fan_creators_on_top(world: World):
    user = fans_user(world)
    c = truth_candidates(world, user)
    assert c.fan_fresh.sum() >= 2
    on = FeedPolicy(only(fans_first=FansFirstStep(slots=2, fresh_days=None)), HEADS, SCENARIOS).page(c, K, "feed")
    assert c.fan_fresh[on.index[:2]].all()
    assert [r[0] for r in on.reasons[:2]] == ["fan", "fan"]
    off = FeedPolicy(PolicyConfig.engagement_only(), HEADS, SCENARIOS).page(c, K, "feed")
    assert c.fan_fresh[on.index].sum() >= c.fan_fresh[off.index].sum()
    assert "fan" not in {r[0] for r in off.reasons}


def test_quality_support_reaches_the_configured_share(world: World):
    share = 0.5
    pol_on = FeedPolicy(only(quality=QualityStep(min_share=share)), HEADS, SCENARIOS)
    pol_off = FeedPolicy(PolicyConfig.engagement_only(), HEADS, SCENARIOS)
    below = 0
    for user in range(0, 60):
        c = truth_candidates(world, user, hq_quantile=0.9)
        off, on = pol_off.page(c, K, "feed"), pol_on.page(c, K, "feed")
        below += c.high_quality[off.index].mean() < share
        assert c.high_quality[on.index].mean() >= share
        promoted = [i for i, r in zip(on.index, on.reasons) if "quality_support" in r]
        assert all(c.high_quality[promoted])
    assert below > 10  # the step had work to do


def test_exposure_fairness_lowers_creator_gini(world: World):
    control = ExposureControl(half_life_pages=300, gini_target=0.3, update_every=10, gain=0.3)
    results = {}
    for name, cfg in (("off", PolicyConfig.engagement_only()), ("on", only(exposure=ExposureStep(strength=1.0)))):
        tracker = ExposureTracker(world.spec.n_creators, control)
        pol = FeedPolicy(cfg, HEADS, SCENARIOS)
        rng = np.random.default_rng(0)
        tags = 0
        for user in rng.integers(0, world.spec.n_users, 400):
            page = pol.page(truth_candidates(world, int(user)), K, "feed", tracker)
            tags += sum("exposure_boost" in r for r in page.reasons)
        results[name] = (gini(tracker.exposure()), tags, tracker.boost)
    assert results["on"][0] < results["off"][0] - 0.1, results
    assert results["on"][1] > 0 and results["off"][1] == 0


def test_relevance_placement_keeps_the_boosted_page_and_orders_it_by_fused_score(world: World):
    """placement=relevance: the boost picks the same items; they are laid out by fused score (here without
    a category window, so exactly by fused score), while placement=score puts boosted items first."""
    control = ExposureControl(update_every=5, initial_boost=4.0)
    pages = {}
    for placement in ("score", "relevance"):
        tracker = ExposureTracker(world.spec.n_creators, control)
        pol = FeedPolicy(only(exposure=ExposureStep(placement=placement),
                              diversity=DiversityStep(max_per_creator=2, category_window=0)), HEADS, SCENARIOS)
        for user in range(30):
            c = truth_candidates(world, user)
            pages.setdefault(placement, []).append((c, pol.page(c, K, "feed", tracker)))
    out_of_order = 0
    for (c, by_score), (_, by_rel) in zip(pages["score"], pages["relevance"]):
        assert sorted(by_score.index.tolist()) == sorted(by_rel.index.tolist())
        assert np.all(np.diff(by_rel.fused) <= 1e-6)
        out_of_order += bool(np.any(np.diff(by_score.fused) > 1e-6))
        tags = {int(i): t for i, t in zip(by_score.index, by_score.reasons)}
        assert all(tags[int(i)] == t for i, t in zip(by_rel.index, by_rel.reasons))
    assert out_of_order > 0  # the boost did reorder the score-placed pages


def test_demote_pushes_over_exposed_creators_down(world: World):
    """With one creator far above the mean exposure, demote > 0 pushes its best item down (off the page)."""
    c = truth_candidates(world, 0)
    fused = fuse(c.preds, np.array([1.0, 2.0, -30.0], dtype=np.float32))
    top_creator = int(c.creator[int(np.argmax(np.where(c.allowed, fused, -np.inf)))])
    control = ExposureControl(update_every=1000, initial_boost=0.5)
    ranks = {}
    for demote in (0.0, 4.0):
        tracker = ExposureTracker(world.spec.n_creators, control)
        # Every creator shown once, the top one 20 times: the others sit a little below the mean (small
        # boost), the top one far above it.
        tracker.record(np.r_[np.full(19, top_creator), np.arange(world.spec.n_creators)])
        assert tracker.over_exposure(np.array([top_creator]))[0] > 0.8
        assert tracker.over_exposure(np.array([(top_creator + 1) % world.spec.n_creators]))[0] == 0.0
        pol = FeedPolicy(only(exposure=ExposureStep(demote=demote)), HEADS, SCENARIOS)
        page = pol.page(c, K, "feed", tracker)
        on_page = c.creator[page.index] == top_creator
        ranks[demote] = int(np.argmax(on_page)) if on_page.any() else K
    assert ranks[0.0] < K and ranks[4.0] > ranks[0.0]


def test_diversity_caps_creators_and_spreads_categories(world: World):
    pol_on = FeedPolicy(only(diversity=DiversityStep(max_per_creator=2, category_window=2)), HEADS, SCENARIOS)
    pol_off = FeedPolicy(PolicyConfig.engagement_only(), HEADS, SCENARIOS)
    violations_off = 0
    for user in range(0, 40):
        c = truth_candidates(world, user)
        on, off = pol_on.page(c, K, "feed"), pol_off.page(c, K, "feed")
        assert np.bincount(c.creator[on.index]).max() <= 2
        cats = c.category[on.index]
        assert all(cats[i] not in cats[max(0, i - 2):i] for i in range(len(cats)))
        violations_off += np.bincount(c.creator[off.index]).max() > 2
    assert violations_off > 0


def test_exploration_gives_slots_to_new_categories(world: World):
    pol = FeedPolicy(only(exploration=ExplorationStep(slots=2)), HEADS, SCENARIOS)
    for user in range(0, 20):
        c = truth_candidates(world, user)
        page = pol.page(c, K, "feed")
        explored = [i for i, r in zip(page.index, page.reasons) if r[0] == "exploration"]
        assert len(explored) == 2
        assert c.new_category[explored].all()
        assert len(set(c.category[explored])) == 2


def test_all_steps_together_keep_their_promises(world: World):
    cfg = PolicyConfig(fans_first=FansFirstStep(slots=2, fresh_days=None), quality=QualityStep(min_share=0.3),
                       diversity=DiversityStep(max_per_creator=2, category_window=1), exploration=ExplorationStep(slots=1))
    pol = FeedPolicy(cfg, HEADS, SCENARIOS)
    tracker = ExposureTracker(world.spec.n_creators, cfg.exposure_control)
    user = fans_user(world)
    c = truth_candidates(world, user)
    page = pol.page(c, K, "feed", tracker)
    assert len(page.index) == K and len(set(page.index)) == K
    assert c.allowed[page.index].all()
    assert np.bincount(c.creator[page.index]).max() <= 2
    assert c.high_quality[page.index].mean() >= 0.3
    assert [r[0] for r in page.reasons[:2]] == ["fan", "fan"]
    assert sum(r[0] == "exploration" for r in page.reasons) == 1


# --------------------------------------------------------------------------- config


def test_scenario_overrides_apply_and_unknown_keys_are_named():
    cfg = load_policy({"fans_first": {"slots": 3}, "scenarios": {"commerce": {"fans_first": {"slots": 0},
                                                                              "quality": {"min_share": 0.5}}}})
    assert cfg.for_scenario("feed").fans_first.slots == 3
    assert cfg.for_scenario("commerce").fans_first.slots == 0
    assert cfg.for_scenario("commerce").quality.min_share == 0.5
    with pytest.raises(ConfigError, match="policy.scenarios.commerce.fans_frist"):
        load_policy({"scenarios": {"commerce": {"fans_frist": {}}}})
    with pytest.raises(ConfigError, match="policy.diversity.max_per_creatr"):
        load_policy({"diversity": {"max_per_creatr": 2}})
    with pytest.raises(ConfigError, match="min_share"):
        load_policy({"quality": {"min_share": 1.5}})
    with pytest.raises(ConfigError, match="no such scenario"):
        FeedPolicy(load_policy({"scenarios": {"nope": {}}}), HEADS, SCENARIOS)


def test_diversity_fill_matches_a_plain_greedy_loop():
    """The heap-based fill equals the obvious O(n * k) greedy: best takeable item whose category is not
    among the last `window` placed, else the best takeable item."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        n, k, cap, window = int(rng.integers(1, 60)), int(rng.integers(1, 25)), int(rng.integers(1, 4)), int(rng.integers(0, 4))
        creator = rng.integers(0, int(rng.integers(1, 12)), n).tolist()
        category = rng.integers(0, int(rng.integers(1, 6)), n).tolist()
        order = rng.permutation(n).tolist()

        def run_fast():
            taken, per = set(), {}
            can = lambda i: i not in taken and per.get(creator[i], 0) < cap  # noqa: E731

            def take(i, _why):
                taken.add(i)
                per[creator[i]] = per.get(creator[i], 0) + 1

            return FeedPolicy._fill(order, category, k, window, can, take, [])

        def run_loop():
            taken, per, recent, out = set(), {}, [], []
            while len(out) < k:
                ok = [i for i in order if i not in taken and per.get(creator[i], 0) < cap]
                if not ok:
                    break
                fresh = [i for i in ok if not window or category[i] not in recent]
                i = (fresh or ok)[0]
                taken.add(i)
                per[creator[i]] = per.get(creator[i], 0) + 1
                out.append(i)
                if window:
                    recent = (recent + [category[i]])[-window:]
            return out

        assert run_fast() == run_loop(), trial


def test_exposure_controller_steers_the_boost_toward_the_gini_target():
    """Above the target the boost grows by (1 + gain) per update up to max_boost; below it, it shrinks."""
    control = ExposureControl(half_life_pages=1000, gini_target=0.5, update_every=1, gain=0.5, initial_boost=1.0,
                              max_boost=2.0)
    t = ExposureTracker(10, control)
    for step in range(3):  # one creator takes every slot: Gini 0.9 > 0.5
        t.record(np.array([0]))
    assert t.current_gini == pytest.approx(0.9) and t.boost == pytest.approx(2.0)  # 1.5, 2.25 -> capped at 2.0
    for _ in range(200):  # every creator equally often: Gini falls under the target, the boost decays
        t.record(np.arange(10))
    assert t.current_gini < 0.5 and t.boost < 1e-3


def test_engagement_only_keeps_governance_and_fusion_of_its_base():
    base = load_policy({"governance": {"blocked_items": ["i1"], "blocked_creators": ["c9"]},
                        "fusion": {"weights": {"hate": -50.0}}, "quality": {"min_share": 0.5},
                        "scenarios": {"commerce": {"fusion": {"mode": "product"}, "fans_first": {"slots": 0}}}})
    eo = PolicyConfig.engagement_only(base)
    assert eo.governance == base.governance and eo.fusion == base.fusion
    assert eo.for_scenario("commerce").fusion.mode == "product"
    for steps in (eo, eo.for_scenario("commerce")):
        assert not any(s.enabled for s in (steps.fans_first, steps.quality, steps.exposure, steps.diversity,
                                           steps.exploration))
    pol = FeedPolicy(eo, HEADS, SCENARIOS)
    np.testing.assert_allclose(pol.weights["feed"], [1.0, 2.0, -50.0])


def test_trackers_sharing_a_store_act_as_one(tmp_path):
    """Two workers' trackers on one store file, pages alternating between them, end exactly where one
    in-memory tracker given every page ends: counts, pages, boost and Gini."""
    control = ExposureControl(half_life_pages=40, update_every=7, gain=0.3)
    rng = np.random.default_rng(0)
    pages = [rng.integers(0, 30, 10) for _ in range(120)]
    alone = ExposureTracker(30, control)
    a = ExposureTracker(30, control, store=tmp_path / "exposure.bin")
    b = ExposureTracker(30, control, store=tmp_path / "exposure.bin")
    for i, p in enumerate(pages):
        alone.record(p)
        (a if i % 2 else b).record(p)
    for t in (a, b):
        np.testing.assert_allclose(t.exposure(), alone.exposure(), rtol=1e-12)
        assert t.pages == alone.pages == 120
        assert t.boost == pytest.approx(alone.boost) and t.current_gini == pytest.approx(alone.current_gini)
        assert t.mean_exposure() == pytest.approx(alone.mean_exposure())
    # A worker started later maps the same state instead of starting from zero.
    assert ExposureTracker(30, control, store=tmp_path / "exposure.bin").pages == 120


def _record_pages(path: str, n: int) -> None:
    t = ExposureTracker(20, ExposureControl(update_every=5), store=path)
    for i in range(n):
        t.record(np.array([i % 20, (i * 7) % 20]))


def test_concurrent_processes_lose_no_update(tmp_path):
    import multiprocessing as mp

    path = str(tmp_path / "exposure.bin")
    ExposureTracker(20, ExposureControl(update_every=5), store=path)  # create it before the workers race
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_record_pages, args=(path, 400)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    t = ExposureTracker(20, ExposureControl(update_every=5), store=path)
    assert t.pages == 1200
    # Every page added two slots: the decayed counts add up to the decayed page weights.
    hl = t.control.half_life_pages
    expected = 2 * sum(2.0 ** (-(1200 - k) / hl) for k in range(1, 1201))
    assert t.exposure().sum() == pytest.approx(expected, rel=1e-9)
