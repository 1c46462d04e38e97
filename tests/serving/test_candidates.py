"""The per-user seen memory: window, bounds, thread-safe order; quota resolution."""

from __future__ import annotations

import pytest

from features.config import ConfigError
from serving.candidates import SeenMemory, channel_quotas
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
    assert channel_quotas({"ann": 5}, {"ann": 1, "covisit": 2}, 500, True) == {"ann": 5}
    # The bundle's validated mix, scaled to serving.candidates; the ANN takes the rounding.
    assert channel_quotas({}, {"ann": 400, "covisit": 100}, 500, True) == {"ann": 400, "covisit": 100}
    assert channel_quotas({}, {"ann": 400, "covisit": 70, "fresh": 30}, 20, True) == {"ann": 17, "covisit": 2, "fresh": 1}
    assert channel_quotas({}, {"ann": 1, "covisit": 2}, 500, False) == {"ann": 500}
    with pytest.raises(ConfigError, match="unknown channels \\['nope'\\]"):
        ServingConfig(channel_quotas={"nope": 3})
