"""The whole config is checked before any work: heads, scenarios, positives and the policy's fusion weights
name declared signals, and the fit CLI stops in one line before building features."""

from __future__ import annotations

import subprocess
import sys

import pytest

from features.config import ConfigError, load_config
from tests.conftest import REPO, write_config
from training.config import TrainConfig


@pytest.mark.parametrize("override, message", [
    ("ranking.scenarios.feed.clicks=1", r"ranking\.scenarios\.feed names 'clicks', not a head"),
    ("ranking.heads=[click, nope]", r"ranking\.heads names 'nope'"),
    ("retrieval.positive_signal=watch_time", r"retrieval\.positive_signal = 'watch_time' is not a binary signal"),
    ("policy.fusion.weights.likes=2", r"policy\.fusion\.weights names 'likes', not a ranking head"),
    ("policy.scenarios.commerce.fusion.weights.x=1", r"policy\.scenarios\.commerce\.fusion\.weights names 'x'"),
    ("fans.follow_signal=watch_time", r"fans\.follow_signal = 'watch_time' is not a declared binary signal"),
    ("data.interactions.duration_column=null", r"watch_time_signal needs data\.interactions\.duration_column"),
    ("quality.score_weights.likes=1", r"quality\.score_weights names 'likes'"),
    ("retrieval.prior_days=[0, -1]", r"prior_days be \(a list of\) values >= 0, got \[0\.0\], \[0\.0, -1\.0\]"),
    ("retrieval.prior_days=-2", r"prior_days be \(a list of\) values >= 0"),
    ("retrieval.prior_days=[]", r"prior_days be \(a list of\) values >= 0"),
    ("retrieval.prior_days=recent", r"retrieval\.prior_days: 'recent' fits none of"),
])
def test_bad_roles_are_named_at_load_time(synthetic_config, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(synthetic_config, [override], TrainConfig)


def test_the_prior_window_is_one_number_or_a_grid(synthetic_config):
    one = load_config(synthetic_config, ["retrieval.prior_days=3"], TrainConfig).retrieval
    grid = load_config(synthetic_config, ["retrieval.prior_days=[0, 2, 2, 1]"], TrainConfig).retrieval
    assert one.prior_day_grid == [3.0] and grid.prior_day_grid == [0.0, 2.0, 1.0]  # config order, once each


def test_defaults_follow_the_declared_signals(world, tmp_path):
    """A ratings log declares one signal: history, the retrieval positive and the one fusion scenario use it."""
    cfg = load_config(write_config(world, tmp_path, layout="ratings"), [], TrainConfig)
    assert cfg.history.signal == "like" and cfg.retrieval.positive_signal == "like"
    assert cfg.ranking.scenarios == {"feed": {"like": 1.0}}
    assert cfg.fans.follow_signal is None and cfg.data.context_columns == []


def test_fit_stops_before_any_work(synthetic_config, tmp_path):
    r = subprocess.run([sys.executable, "-m", "training", "fit", "--config", str(synthetic_config), "--set",
                        f"output_dir={tmp_path / 'out'}", "--set", "ranking.scenarios.feed.clikc=1", "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "ranking.scenarios.feed names 'clikc'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "features").exists()
