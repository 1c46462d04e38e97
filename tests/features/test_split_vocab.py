import numpy as np
import pandas as pd
import pytest

from features.config import ConfigError, SplitConfig
from features.split import DAY_MS, make_split
from features.vocab import Vocab

T0 = 1_650_844_800_000 - 8 * 3_600_000  # local midnight at UTC+8


def test_dates_split_blocks_and_periods():
    ts = T0 + np.arange(0, 10 * DAY_MS, 3_600_000)
    cfg = SplitConfig(mode="dates", valid_start="2022-05-01", test_start="2022-05-03", train_block_hours=24)
    s = make_split(ts, cfg, utc_offset_hours=8)
    assert s.valid_start == T0 + 6 * DAY_MS and s.test_start == T0 + 8 * DAY_MS
    period, block = s.period_of(ts), s.block_of(ts)
    assert (np.diff(period) >= 0).all() and set(period) == {0, 1, 2}
    assert len(set(block[period == 1])) == 1 and len(set(block[period == 2])) == 1
    assert len(set(block[period == 0])) == 6  # one block per train day
    for b in np.unique(block):  # every row's block starts at or before the row
        assert (ts[block == b] >= s.block_starts[b]).all()
    assert s.block_starts[-1] == s.end and s.serving_block == s.n_blocks - 1


def test_fraction_split_aligns_to_days():
    ts = T0 + np.arange(0, 10 * DAY_MS, 600_000)
    s = make_split(ts, SplitConfig(mode="fractions", valid_fraction=0.2, test_fraction=0.2), utc_offset_hours=8)
    assert (s.valid_start - T0) % DAY_MS == 0 and (s.test_start - T0) % DAY_MS == 0
    assert s.valid_start == T0 + 6 * DAY_MS and s.test_start == T0 + 8 * DAY_MS


def test_bad_boundaries_are_named():
    ts = T0 + np.arange(0, 3 * DAY_MS, 3_600_000)
    with pytest.raises(ConfigError, match="valid_start .* <= test_start"):
        make_split(ts, SplitConfig(mode="dates", valid_start="2022-04-27", test_start="2022-04-26"), 8)
    with pytest.raises(ConfigError, match="neither epoch ms nor an ISO date"):
        make_split(ts, SplitConfig(mode="dates", valid_start="someday", test_start="2022-04-26"), 8)


def test_vocab_is_deterministic_with_oov_and_min_count():
    values = pd.Series(["b", "a", "c", "a", "b", "a"])
    v1 = Vocab.build("x", values, min_count=2)
    v2 = Vocab.build("x", values.sample(frac=1.0, random_state=3), min_count=2)
    assert v1.ids == v2.ids == ["a", "b"]
    assert list(v1.encode(["a", "b", "c", "zzz"])) == [1, 2, 0, 0]
    assert v1.decode(np.array([2, 0])) == ["b", None]
    assert len(v1) == 3


def test_all_mode_puts_every_row_in_train_with_daily_blocks():
    ts = T0 + np.arange(0, 5 * DAY_MS, 3_600_000)
    s = make_split(ts, SplitConfig(mode="all", train_block_hours=24), utc_offset_hours=8)
    period, block = s.period_of(ts), s.block_of(ts)
    assert set(period) == {0}
    assert len(set(block)) == 5  # one block per day, the last day included
    assert s.valid_start == s.test_start == s.end == s.block_starts[-1]
    for b in np.unique(block):
        assert (ts[block == b] >= s.block_starts[b]).all()
