"""User-side behaviour aggregates: each against a plain loop over earlier rows, future rows change nothing
in the past, and the serving snapshot (what a bundle looks up) equals a loop over the whole log."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.build import build_features
from features.config import ConfigError, load_config
from tests.conftest import write_config

DAY_MS = 86_400_000


def _rows(tables) -> pd.DataFrame:
    return pd.read_parquet(tables.dir / "interactions.parquet")


def test_behaviour_columns_match_a_plain_loop(synthetic_tables):
    k = synthetic_tables.manifest["config"]["quality"]["prior_strength"]
    starts = synthetic_tables.manifest["split"]["block_starts"]
    rows = _rows(synthetic_tables)
    rng = np.random.default_rng(1)
    picks = np.r_[rng.choice(len(rows), 20, replace=False), np.flatnonzero(rows["period"] == "test")[:5]]
    for i in picks:
        r = rows.iloc[i]
        before = rows[rows["ts"] < starts[r["block"]]]
        g = before["click"].mean() if len(before) else 0.0
        mine = before[before["user_id"] == r["user_id"]]
        assert np.isclose(r["user_rate_click"], (mine["click"].sum() + k * g) / (len(mine) + k), atol=1e-6)
        assert np.isclose(r["user_n"], np.log1p(len(mine)), rtol=1e-5)
        days = max((starts[r["block"]] - starts[0]) / DAY_MS, 1.0)
        assert np.isclose(r["user_activity"], len(mine) / days, rtol=1e-4)
        ratio = mine["watch_ratio"].dropna().clip(upper=3.0)
        gr = before["watch_ratio"].dropna().clip(upper=3.0)
        g_ratio = gr.mean() if len(gr) else 0.0
        assert np.isclose(r["user_watch_ratio"], (ratio.sum() + k * g_ratio) / (len(ratio) + k), atol=1e-5)
        pair = before[(before["user_id"] == r["user_id"]) & (before["creator_id"] == r["creator_id"])]
        assert r["uc_n"] == len(pair) and r["uc_long_view"] == pair["long_view"].sum()
        assert r["uc_hate"] == pair["hate"].sum()
        ctx = before[(before["item_id"] == r["item_id"]) & (before["tab"] == r["tab"])]
        assert np.isclose(r["item_tab_rate_like"], (ctx["like"].sum() + k * (before["like"].mean() if len(before) else 0.0)) / (len(ctx) + k),
                          atol=1e-6)
        cctx = before[(before["creator_id"] == r["creator_id"]) & (before["tab"] == r["tab"])]
        assert np.isclose(r["creator_tab_n"], np.log1p(len(cctx)), rtol=1e-5)


def test_changing_future_rows_leaves_past_behaviour_unchanged(world, tmp_path):
    cols = ["user_n", "user_rate_click", "user_activity", "uc_n", "uc_click", "item_tab_rate_like", "creator_tab_n"]
    base = build_features(load_config(write_config(world, tmp_path / "a")), progress=False)
    valid_start = base.manifest["split"]["valid_start"]
    changed = world.log.copy()
    future = changed["time_ms"] >= valid_start
    for col in ("is_click", "is_like"):
        changed.loc[future, col] = 1 - changed.loc[future, col]
    path = write_config(world, tmp_path / "b")
    changed.to_csv(tmp_path / "b" / "data" / "log.csv", index=False)
    after = pd.read_parquet(build_features(load_config(path), progress=False).out_dir / "interactions.parquet")
    rows = pd.read_parquet(base.out_dir / "interactions.parquet")
    past = (rows["period"] == "train").to_numpy()
    pd.testing.assert_frame_equal(rows.loc[past, cols], after.loc[past, cols])
    test = (rows["period"] == "test").to_numpy()
    assert not np.allclose(rows.loc[test, "user_rate_click"], after.loc[test, "user_rate_click"])


def test_serving_snapshot_counts_the_whole_log(synthetic_tables):
    rows = _rows(synthetic_tables)
    pairs = rows.groupby(["user_id", "creator_id"]).agg(n=("click", "size"), click=("click", "sum")).reset_index()
    sample = pairs.sample(30, random_state=0)
    later = sample[["user_id", "creator_id"]].assign(item_id=rows["item_id"].iloc[0], tab=rows["tab"].iloc[0])
    got = synthetic_tables.attach_snapshot(later)
    np.testing.assert_array_equal(got["uc_n"].to_numpy(), sample["n"].to_numpy())
    np.testing.assert_array_equal(got["uc_click"].to_numpy(), sample["click"].to_numpy())
    # A pair never seen and a row without the context column get the recorded priors.
    priors = synthetic_tables.spec["behaviour"]["priors"]
    unseen = synthetic_tables.attach_snapshot(pd.DataFrame({"user_id": ["nobody"], "creator_id": ["none"],
                                                            "item_id": ["none"]}))
    assert unseen["uc_n"].iloc[0] == 0 and np.isnan(unseen["user_n"].iloc[0])
    assert np.isclose(unseen["item_tab_rate_click"].iloc[0], priors["item_tab_rate_click"])


def test_behaviour_signals_must_be_binary(world, tmp_path):
    with pytest.raises(ConfigError, match=r"behaviour.signals\[0\] = 'watch_time' is not a declared binary signal"):
        load_config(write_config(world, tmp_path, behaviour={"signals": ["watch_time"]}))
