"""Features of a period come only from data before that period starts."""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.build import build_features
from features.config import load_config
from tests.conftest import write_config

FEATURES = ["item_n", "item_rate_like", "item_quality", "creator_rate_long_view", "creator_quality",
            "is_fan", "is_iron_fan", "fan_interactions"]


def _build(world, root, log: pd.DataFrame):
    path = write_config(world, root)
    log.to_csv(root / "data" / "log.csv", index=False)
    return build_features(load_config(path), progress=False)


def test_changing_future_rows_leaves_past_features_unchanged(world, tmp_path):
    base = _build(world, tmp_path / "a", world.log)
    rows = pd.read_parquet(base.out_dir / "interactions.parquet")
    valid_start = base.manifest["split"]["valid_start"]

    changed = world.log.copy()
    future = changed["time_ms"] >= valid_start
    for col in ("is_like", "long_view", "is_follow", "is_click"):
        changed.loc[future, col] = 1 - changed.loc[future, col]
    after = pd.read_parquet(_build(world, tmp_path / "b", changed).out_dir / "interactions.parquet")

    past = (rows["period"] == "train").to_numpy()
    pd.testing.assert_frame_equal(rows.loc[past, FEATURES], after.loc[past, FEATURES])
    h0 = np.stack(rows.loc[past, "history"].to_numpy())
    h1 = np.stack(after.loc[past, "history"].to_numpy())
    np.testing.assert_array_equal(h0, h1)
    # ...while the test period, whose snapshot includes the changed validation days, does see the change
    test = (rows["period"] == "test").to_numpy()
    assert not np.allclose(rows.loc[test, "item_rate_like"], after.loc[test, "item_rate_like"])


def test_quality_matches_a_plain_loop(synthetic_tables):
    cfg_q = synthetic_tables.manifest["config"]["quality"]
    k = cfg_q["prior_strength"]
    rows = pd.read_parquet(synthetic_tables.dir / "interactions.parquet")
    starts = synthetic_tables.manifest["split"]["block_starts"]
    rng = np.random.default_rng(0)
    for i in rng.choice(len(rows), size=25, replace=False):
        r = rows.iloc[i]
        cutoff = starts[r["block"]]
        before = rows[rows["ts"] < cutoff]
        g = before["like"].mean() if len(before) else 0.0
        mine = before[before["item_id"] == r["item_id"]]
        expect = (mine["like"].sum() + k * g) / (len(mine) + k)
        assert np.isclose(r["item_rate_like"], expect, rtol=1e-5, atol=1e-6)
        assert np.isclose(r["item_n"], np.log1p(len(mine)), rtol=1e-5)


def test_fan_relations_match_a_plain_loop(synthetic_tables):
    fans_cfg = synthetic_tables.manifest["config"]["fans"]
    rows = pd.read_parquet(synthetic_tables.dir / "interactions.parquet")
    starts = synthetic_tables.manifest["split"]["block_starts"]
    window = fans_cfg["iron_fan_window_days"] * 86_400_000
    sigs = fans_cfg["interaction_signals"]
    rng = np.random.default_rng(1)
    idx = np.concatenate([rng.choice(np.flatnonzero(rows["is_iron_fan"] == 1), 10), rng.choice(len(rows), 20)])
    for i in idx:
        r = rows.iloc[i]
        cutoff = starts[r["block"]]
        pair = rows[(rows["user_id"] == r["user_id"]) & (rows["creator_id"] == r["creator_id"]) & (rows["ts"] < cutoff)]
        is_fan = int((pair["follow"] > 0).any())
        recent = pair[pair["ts"] >= cutoff - window]
        inter = int((recent[sigs].sum(axis=1) > 0).sum())
        assert (r["is_fan"], r["fan_interactions"]) == (is_fan, inter)
        assert r["is_iron_fan"] == int(is_fan and inter >= fans_cfg["iron_fan_min_interactions"])


def test_history_matches_a_plain_loop(synthetic_tables):
    rows = pd.read_parquet(synthetic_tables.dir / "interactions.parquet")
    starts = synthetic_tables.manifest["split"]["block_starts"]
    length = synthetic_tables.spec["history"]["length"]
    rng = np.random.default_rng(2)
    for i in rng.choice(len(rows), size=30, replace=False):
        r = rows.iloc[i]
        pos = rows[(rows["user_id"] == r["user_id"]) & (rows["long_view"] == 1) & (rows["ts"] < starts[r["block"]])]
        expect = pos.sort_values("ts", kind="stable")["item_id_idx"].to_numpy()[-length:]
        got = np.asarray(r["history"])
        np.testing.assert_array_equal(got[length - len(expect):], expect)
        assert (got[: length - len(expect)] == 0).all()


def test_fan_features_find_the_true_follows(world, synthetic_tables):
    fans = synthetic_tables.fans
    flagged = {(int(u), int(c) - 1000) for u, c in fans.loc[fans["is_fan"] == 1, ["user_id", "creator_id"]].to_numpy()}
    assert flagged == world.follows
    assert fans["is_iron_fan"].sum() > 0
