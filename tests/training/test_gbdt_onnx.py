"""The hybrid ranker's parts: LightGBM boosters as one ONNX tree ensemble (exact margins through ONNX
Runtime, categorical sets, missing values, one-leaf trees) and the per-head blend chosen out of sample."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from training.onnx_export import session
from training.ranking.gbdt_onnx import splice_trees
from training.ranking.hybrid import fit_blend


def _graph(path: Path, n_cat: int, n_num: int, n_targets: int) -> Path:
    """cat, num, gbdt_margin -> out = gbdt_margin (the splice replaces the margin input)."""
    g = helper.make_graph(
        [helper.make_node("Identity", ["gbdt_margin"], ["out"])], "g",
        [helper.make_tensor_value_info("cat", TensorProto.INT64, [None, n_cat]),
         helper.make_tensor_value_info("num", TensorProto.FLOAT, [None, n_num]),
         helper.make_tensor_value_info("gbdt_margin", TensorProto.FLOAT, [None, n_targets])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, n_targets])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _world(n: int, seed: int):
    rng = np.random.default_rng(seed)
    cat = np.stack([rng.integers(0, 25, n), rng.integers(0, 400, n)], axis=1)
    num = rng.normal(size=(n, 3)).astype(np.float32)
    num[rng.random(n) < 0.15, 1] = np.nan  # a feature with missing values in training
    num[:, 2] = np.round(num[:, 2], 1)  # ties at thresholds
    logit = (cat[:, 0] % 4 == 1) * 1.5 + num[:, 0] - 0.8 * np.isnan(num[:, 1]) + 0.5 * num[:, 2].clip(-1, 1)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    return cat, num, y


def test_spliced_trees_give_lightgbm_margins(tmp_path: Path):
    cat, num, y = _world(6000, 0)
    x = np.concatenate([cat.astype(np.float32), num], axis=1)
    params = {"objective": "binary", "verbosity": -1, "num_leaves": 15, "min_data_in_leaf": 20, "seed": 0}
    boosters = {
        0: lgb.train(params, lgb.Dataset(x, y, categorical_feature=[0]), 40),
        2: lgb.train(params, lgb.Dataset(x, 1 - y, categorical_feature=[0]), 25),
        # min_data_in_leaf above the rows: every tree is a single leaf
        3: lgb.train({**params, "min_data_in_leaf": 10**6}, lgb.Dataset(x, y), 3),
    }
    rounds = {0: 30}  # the first 30 of 40 trees, as an early-stopped head ships
    path = _graph(tmp_path / "g.onnx", 2, 3, 4)
    assert splice_trees(path, boosters, rounds, 4) == 30 + 25 + boosters[3].num_trees()
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["cat", "num"]
    # fresh rows, NaN in every numeric column (also in one never missing in training), unseen categories
    cat_t, num_t, _ = _world(3000, 1)
    cat_t[:50, 0] = 99
    num_t[np.random.default_rng(2).random(num_t.shape) < 0.05] = np.nan
    out = sess.run(None, {"cat": cat_t, "num": num_t})[0]
    xt = np.concatenate([cat_t.astype(np.float32), num_t], axis=1)
    np.testing.assert_allclose(out[:, 0], boosters[0].predict(xt, num_iteration=30, raw_score=True), atol=2e-5)
    np.testing.assert_allclose(out[:, 2], boosters[2].predict(xt, raw_score=True), atol=2e-5)
    np.testing.assert_allclose(out[:, 3], boosters[3].predict(xt, raw_score=True), atol=2e-5)
    assert not out[:, 1].any()  # no booster: margin 0
    assert np.std(out[:, 0]) > 0.3  # the trees really split


def test_splice_needs_the_margin_input(tmp_path: Path):
    path = tmp_path / "g.onnx"
    g = helper.make_graph([helper.make_node("Identity", ["num"], ["out"])], "g",
                          [helper.make_tensor_value_info("num", TensorProto.FLOAT, [None, 2])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 2])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ValueError, match="gbdt_margin"):
        splice_trees(path, {}, {}, 2)


def test_blend_is_used_only_where_the_gbdt_adds_signal():
    rng = np.random.default_rng(0)
    n = 20000
    users = rng.integers(0, 2000, n)
    a, b = rng.normal(size=n), rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(a + b)))).astype(np.float64)
    deep = a + 0.3 * rng.normal(size=n)  # sees half of the signal
    helpful = b + 0.3 * rng.normal(size=n)  # the other half
    blend = fit_blend(deep, helpful, y, users, seed=0)
    assert blend is not None and blend.used
    assert blend.weight > 0.5 and blend.scale > 0.5
    assert blend.valid_auc_blend > blend.valid_auc_deep + 0.05
    noise = fit_blend(deep, rng.normal(size=n), y, users, seed=0)
    assert noise is not None and not noise.used and abs(noise.weight) < 0.1
    assert fit_blend(deep, helpful, np.zeros(n), users, seed=0) is None  # one class: nothing to fit


def test_a_rare_head_takes_the_blend_only_when_its_gain_is_distinguishable():
    rng = np.random.default_rng(1)
    n = 20000
    users = rng.integers(0, 2000, n)
    a, b = rng.normal(size=n), rng.normal(size=n)
    base = -7.0  # ~80 positives in 20k rows: a rare head
    y = (rng.random(n) < 1 / (1 + np.exp(-(base + a + 1.5 * b)))).astype(np.float64)
    assert 20 < y.sum() < 150
    deep = a + 0.3 * rng.normal(size=n)
    strong = fit_blend(deep, b, y, users, seed=0, interval_samples=200)
    assert strong is not None and strong.valid_gain_ci95 is not None
    assert strong.used and strong.valid_gain_ci95[0] > 0
    # A margin that carries a sliver of signal: its mean gain may be positive, its interval holds zero.
    sliver = 0.05 * b + rng.normal(size=n)
    weak = fit_blend(deep, sliver, y, users, seed=0, interval_samples=200)
    assert weak is not None and weak.valid_gain_ci95 is not None
    lo, hi = weak.valid_gain_ci95
    assert lo <= 0 <= hi and not weak.used
    # Without the interval (a head with enough positives) the same margin passes on its mean gain alone.
    plain = fit_blend(deep, sliver, y, users, seed=0)
    assert plain is not None and plain.valid_gain_ci95 is None
    assert plain.valid_auc_blend > plain.valid_auc_deep and plain.used


def test_a_head_whose_deep_logit_would_enter_reversed_serves_its_gbdt_alone():
    rng = np.random.default_rng(2)
    n = 20000
    users = rng.integers(0, 2000, n)
    b = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(b - 1)))).astype(np.float64)
    deep = -0.5 * b + rng.normal(size=n)  # ranks the head backwards
    blend = fit_blend(deep, b, y, users, seed=0)
    assert blend is not None and blend.used
    assert blend.scale == 0 and blend.weight > 0.5
    assert blend.valid_auc_blend == blend.valid_auc_gbdt > blend.valid_auc_deep


def test_with_rounds_keeps_the_named_heads_first_trees_and_their_margins():
    """The hybrid's trees under a budget: a head cut to n trees gets the margins of its first n (recomputed),
    a head left whole keeps its margins, a head not named is dropped."""
    from training.ranking.gbdt import GbdtResult, with_rounds

    cat, num, y = _world(3000, 3)
    inputs = {p: {"cat": c, "num": n} for p, (c, n, _) in (("valid", _world(800, 4)), ("test", _world(700, 5)))}
    x = np.concatenate([cat.astype(np.float32), num], axis=1)
    params = {"objective": "binary", "verbosity": -1, "num_leaves": 7, "min_data_in_leaf": 20, "seed": 0}
    boosters = {"click": lgb.train(params, lgb.Dataset(x, y), 30), "like": lgb.train(params, lgb.Dataset(x, 1 - y), 4),
                "hate": lgb.train(params, lgb.Dataset(x, y), 3)}
    rounds = {"click": 25, "like": 4, "hate": 3}

    def margins(b: lgb.Booster, p: str, n: int) -> np.ndarray:
        xp = np.concatenate([inputs[p]["cat"].astype(np.float32), inputs[p]["num"]], axis=1)
        return b.predict(xp, num_iteration=n, raw_score=True).astype(np.float32)

    full = GbdtResult(boosters, rounds, {p: {h: margins(b, p, rounds[h]) for h, b in boosters.items()}
                                         for p in inputs}, 1.0, 1.0, [])
    cut = with_rounds(full, {"click": 6, "like": 4}, inputs)
    assert cut.rounds == {"click": 6, "like": 4} and set(cut.boosters) == {"click", "like"}
    assert full.rounds == rounds and set(full.boosters) == set(rounds)
    for p in inputs:
        assert set(cut.margins[p]) == {"click", "like"}
        np.testing.assert_allclose(cut.margins[p]["click"], margins(boosters["click"], p, 6), atol=1e-6)
        assert np.abs(cut.margins[p]["click"] - full.margins[p]["click"]).max() > 1e-3
        assert cut.margins[p]["like"] is full.margins[p]["like"]


def test_hybrid_max_trees_must_be_positive():
    from features.config import ConfigError
    from training.ranking.config import RankingConfig

    assert RankingConfig(hybrid_max_trees=3).hybrid_max_trees == 3
    with pytest.raises(ConfigError, match="ranking.hybrid_max_trees must be >= 1"):
        RankingConfig(hybrid_max_trees=0)
