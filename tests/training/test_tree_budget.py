"""The hybrid's tree budget: the knapsack over each head's tree counts, and the main heads served first."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from training.ranking.tree_budget import allocate, choose_tree_counts, tree_grid


def test_tree_grid_is_roughly_geometric_and_ends_at_the_gbdts_count():
    assert tree_grid(1) == [1]
    for rounds in (23, 500):
        grid = tree_grid(rounds)
        assert grid[0] == 1 and grid[-1] == rounds and grid == sorted(set(grid)) and len(grid) < 25
        assert all(b / a <= 1.6 or b - a == 1 for a, b in zip(grid[:-1], grid[1:]))


@pytest.mark.parametrize("seed", range(6))
def test_allocate_matches_brute_force(seed: int):
    rng = np.random.default_rng(seed)
    options = {}
    for h in ("a", "b", "c", "d"):
        counts = sorted(rng.choice(np.arange(1, 40), size=int(rng.integers(1, 5)), replace=False).tolist())
        options[h] = [(n, float(g)) for n, g in zip(counts, np.cumsum(rng.normal(0.002, 0.003, len(counts))))]
    budget = int(rng.integers(0, 80))
    got = allocate(options, budget)
    assert sum(got.values()) <= budget and all(n > 0 for n in got.values())
    value = sum(dict(options[h])[n] for h, n in got.items())
    best = max(sum(g for _, g in pick) for pick in itertools.product(*[[(0, 0.0), *o] for o in options.values()])
               if sum(n for n, _ in pick) <= budget)
    assert value == pytest.approx(max(best, 0.0), abs=1e-12)


def test_allocate_prefers_fewer_trees_at_equal_gain():
    assert allocate({"a": [(3, 0.01), (10, 0.01)], "b": [(5, 0.0)]}, 100) == {"a": 3}


def _head(rng: np.random.Generator, n: int, rate: float, users: np.ndarray):
    """A deep logit that sees half the signal and a GBDT whose first trees see the rest, more with more trees."""
    a, b = rng.normal(size=n), rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(np.log(rate / (1 - rate)) + 1.2 * a + 1.2 * b)))).astype(np.float64)
    noise = rng.normal(size=n)
    return a, (lambda k: 1.2 * b * min(k, 20) / 20 + noise * 0.5), y


def test_choose_tree_counts_serves_the_main_heads_first():
    rng = np.random.default_rng(0)
    n = 6000
    users = rng.integers(0, 800, n)
    heads = [_head(rng, n, 0.3, users), _head(rng, n, 0.3, users), _head(rng, n, 0.01, users)]
    logits = np.stack([h[0] for h in heads], axis=1)
    y = np.stack([h[2] for h in heads], axis=1)
    names = ["click", "long_view", "hate"]
    at = {name: h[1] for name, h in zip(names, heads)}
    spec = [(t, name, 40) for t, name in enumerate(names)]
    tight = choose_tree_counts(logits, lambda h, k: at[h](k), y, users, spec, 30, 300, 0)
    assert sum(tight.chosen.values()) <= 30 and set(tight.chosen) <= {"click", "long_view"}
    assert set(tight.chosen) == {"click", "long_view"}  # both main heads gain from their first trees
    wide = choose_tree_counts(logits, lambda h, k: at[h](k), y, users, spec, 200, 300, 0)
    assert wide.chosen["click"] >= 20 and wide.chosen["long_view"] >= 20  # the gain grows up to 20 trees
    assert all(g[-1][1] > 0 for g in wide.gains.values() if g)
    assert set(tight.to_json()) == {"max_trees", "chosen", "valid_gain"}
