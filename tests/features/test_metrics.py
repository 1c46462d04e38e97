"""The shared NDCG against a plain per-list loop."""

import math

import numpy as np
import pytest

from features.metrics import ndcg


def loop_ndcg(order: list[float], ideal: list[float], k: int) -> float:
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(order[:k]))
    best = sorted(ideal, reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(best))
    return dcg / idcg if idcg > 0 else float("nan")


@pytest.mark.parametrize("k", [1, 3, 10])
def test_ndcg_matches_loop(k: int) -> None:
    rng = np.random.default_rng(k)
    order = rng.integers(0, 3, size=(40, 6)).astype(float)
    ideal = np.concatenate([order, rng.integers(0, 3, size=(40, 3))], axis=1)  # missed positives count
    got = ndcg(order, ideal, k)
    want = np.array([loop_ndcg(list(o), list(i), k) for o, i in zip(order, ideal)])
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.allclose(got[~np.isnan(got)], want[~np.isnan(want)])


def test_ndcg_perfect_and_empty() -> None:
    gains = np.array([[3.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    got = ndcg(gains, gains, 3)
    assert got[0] == pytest.approx(1.0) and np.isnan(got[1])
    assert ndcg(gains[:, ::-1], gains, 3)[0] < 1.0
