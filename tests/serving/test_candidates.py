"""The per-user seen memory: window, bounds, thread-safe order; quota resolution; the MF channel in the merge."""

from __future__ import annotations

import numpy as np
import pytest

from features.config import ConfigError
from serving.candidates import CHANNEL_REASONS, SeenMemory, channel_quotas, merge_for_user
from serving.config import ServingConfig


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_seen_memory_window_and_bounds():
    clock = Clock()
    m = SeenMemory(window_s=10, max_users=2, max_items=3, clock=clock)
    assert m.add_and_get("a", ["1", "2"]) == ["1", "2"]
    clock.t = 5
    assert m.add_and_get("a", ["3", "4"]) == ["2", "3", "4"]  # at most 3 per user, newest kept
    assert m.add_and_get("b", []) == [] and len(m) == 1  # asking without reporting remembers nothing
    clock.t = 12
    assert m.add_and_get("a", []) == ["3", "4"]  # "2" (t=0) left the 10 s window
    m.add_and_get("b", ["x"])
    m.add_and_get("c", ["y"])  # a third user: the least recently active ("a") is forgotten
    assert len(m) == 2 and m.add_and_get("a", []) == []
    clock.t = 100
    assert m.add_and_get("c", []) == [] and len(m) == 1


def test_quotas_come_from_config_then_bundle():
    assert channel_quotas({"ann": 5}, {"ann": 1, "covisit": 2}, 500, {"covisit", "trending", "fresh"}) == {"ann": 5}
    # The bundle's validated mix, scaled to serving.candidates; the ANN takes the rounding.
    assert channel_quotas({}, {"ann": 400, "covisit": 100}, 500, {"covisit", "trending", "fresh"}) == {"ann": 400, "covisit": 100}
    assert channel_quotas({}, {"ann": 400, "covisit": 70, "fresh": 30}, 20, {"covisit", "trending", "fresh"}) == {"ann": 17, "covisit": 2, "fresh": 1}
    assert channel_quotas({}, {"ann": 1, "covisit": 2}, 500, set()) == {"ann": 500}
    with pytest.raises(ConfigError, match="unknown channels \\['nope'\\]"):
        ServingConfig(channel_quotas={"nope": 3})
    # The MF channel's quota goes to the ANN where the bundle's vectors carry no MF dimensions.
    assert channel_quotas({"ann": 5, "mf": 3}, None, 500, {"covisit", "trending", "fresh"}) == {"ann": 8}
    assert channel_quotas({}, {"ann": 400, "mf": 100}, 500, {"mf"}) == {"ann": 400, "mf": 100}
    assert channel_quotas({}, {"ann": 400, "mf": 100}, 500, {"covisit", "trending", "fresh"}) == {"ann": 500}


def test_mf_channel_adds_the_best_mf_items_the_ann_did_not_take():
    rng = np.random.default_rng(0)
    items, user = rng.normal(size=(40, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    blocked = np.zeros(40, bool)
    blocked[[3, 7]] = True
    ann = np.array([0, 1, 2, 3])  # row 3 is blocked: the ANN keeps 0, 1, 2
    rows, tags = merge_for_user(None, {"ann": 3, "mf": 5}, ann, np.zeros(5, np.int64), np.zeros(1, np.int64),
                                blocked, (user, items))
    score = items @ user
    expected = [r for r in np.argsort(-score) if r not in (0, 1, 2, 3, 7)][:5]
    assert rows[:3].tolist() == [0, 1, 2] and rows[3:].tolist() == expected
    assert [CHANNEL_REASONS[t] for t in tags] == ["channel:ann"] * 3 + ["channel:mf"] * 5
    # A user the ALS fit never saw (all-zero factors) gets no MF candidates, not an arbitrary order.
    rows, tags = merge_for_user(None, {"ann": 3, "mf": 5}, ann, np.zeros(5, np.int64), np.zeros(1, np.int64),
                                blocked, (np.zeros(4, np.float32), items))
    assert rows.tolist() == [0, 1, 2]
