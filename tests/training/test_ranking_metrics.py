"""Ranking metrics against sklearn and plain loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from training.ranking.metrics import auc, ece, gauc, logloss, ndcg_at_k, xauc


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    n = 600
    users = rng.integers(0, 40, n)
    p = np.round(rng.random(n), 2)  # rounding makes ties
    y = (rng.random(n) < 0.3 * p + 0.2 * (users % 3 == 0)).astype(int)
    return y, p, users


def test_auc_and_logloss_match_plain_definitions(data):
    y, p, _ = data
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in p[y == 1] for b in p[y == 0]]
    assert auc(y, p) == pytest.approx(np.mean(pairs), abs=1e-12)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    assert logloss(y, p) == pytest.approx(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)), rel=1e-9)
    assert math.isnan(auc(np.zeros(5), np.arange(5.0))) and math.isnan(auc(np.ones(5), np.arange(5.0)))
    assert logloss(np.ones(3), np.ones(3)) == pytest.approx(-np.log(1 - 1e-7), rel=1e-6)  # one class, p = 1


def test_gauc_matches_plain_loop(data):
    y, p, users = data
    num = den = 0.0
    n_groups = 0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            pairs = [(a, b) for a, b in itertools.product(p[m][y[m] == 1], p[m][y[m] == 0])]
            user_auc = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs])
            num += m.sum() * user_auc
            den += m.sum()
            n_groups += 1
    value, groups = gauc(y, p, users)
    assert groups == n_groups
    assert value == pytest.approx(num / den, abs=1e-12)


def test_ece_matches_loop(data):
    y, p, _ = data
    bins = 10
    total = 0.0
    for b in range(bins):
        m = (p >= b / bins) & (p < (b + 1) / bins) if b < bins - 1 else (p >= b / bins)
        if m.any():
            total += m.sum() / len(p) * abs(y[m].mean() - p[m].mean())
    assert ece(y, p, bins) == pytest.approx(total, abs=1e-12)
    # A perfectly calibrated constant predictor has ECE 0; a shifted one has ECE = the shift.
    assert ece(y, np.full(len(y), y.mean()), bins) == pytest.approx(0.0, abs=1e-12)
    assert ece(y, np.full(len(y), y.mean() + 0.05), bins) == pytest.approx(0.05, abs=1e-12)


def test_xauc_matches_pair_loop():
    rng = np.random.default_rng(5)
    w = rng.integers(0, 30, 150).astype(float)  # ties in truth
    pred = np.round(w + rng.normal(0, 8, 150))  # ties in prediction
    good = pairs = 0.0
    for i in range(len(w)):
        for j in range(i + 1, len(w)):
            if w[i] == w[j]:
                continue
            pairs += 1
            s = np.sign(w[i] - w[j]) * np.sign(pred[i] - pred[j])
            good += 1.0 if s > 0 else 0.5 if s == 0 else 0.0
    assert xauc(w, pred) == pytest.approx(good / pairs, abs=1e-12)


def test_ndcg_matches_loop():
    rng = np.random.default_rng(9)
    n = 300
    users = rng.integers(0, 25, n)
    users[-1] = 99  # a one-impression user is left out
    gains = np.where(rng.random(n) < 0.3, rng.integers(1, 4, n), 0).astype(float)
    scores = gains + rng.normal(0, 1.5, n)
    k = 5
    vals = []
    for u in np.unique(users):
        idx = np.flatnonzero(users == u)
        if len(idx) < 2:
            continue
        order = idx[np.argsort(-scores[idx], kind="stable")]
        ideal = np.sort(gains[idx])[::-1]
        disc = 1 / np.log2(np.arange(2, k + 2))
        idcg = float(np.sum(ideal[:k] * disc[: len(ideal[:k])]))
        if idcg > 0:
            vals.append(float(np.sum(gains[order][:k] * disc[: len(order[:k])])) / idcg)
    value, n_users = ndcg_at_k(scores, gains, users, k)
    assert n_users == len(vals)
    assert value == pytest.approx(np.mean(vals), abs=1e-12)
    assert ndcg_at_k(gains, gains, users, k)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-negative"):
        ndcg_at_k(scores, gains - 1, users, k)


def test_weighted_auc_equals_auc_of_repeated_rows():
    from training.ranking.metrics import auc, weighted_auc

    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.2
    p = np.round(rng.random(300), 2)  # ties
    w = rng.integers(0, 4, 300)
    assert np.isclose(weighted_auc(y, p, np.ones(300)), auc(y, p))
    assert np.isclose(weighted_auc(y, p, w), auc(np.repeat(y, w), np.repeat(p, w)))


def test_user_bootstrap_interval_brackets_the_auc_and_narrows_with_more_users():
    from training.ranking.metrics import auc, bootstrap_auc_interval

    rng = np.random.default_rng(4)

    def width(n_users: int) -> float:
        users = np.repeat(np.arange(n_users), 10)
        y = rng.random(len(users)) < 0.1
        p = y * 0.5 + rng.random(len(users))
        lo, hi = bootstrap_auc_interval(y, p, users, 200, seed=0)
        assert lo < auc(y, p) < hi
        assert (lo, hi) == bootstrap_auc_interval(y, p, users, 200, seed=0)  # seeded
        return hi - lo

    assert width(2000) < width(100)


def test_paired_bootstrap_difference_matches_a_resampling_loop_and_separates_real_gaps():
    from training.ranking.metrics import auc, bootstrap_auc_difference

    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(150), 8)
    y = (rng.random(len(users)) < 0.3).astype(int)
    good = y + rng.normal(0, 0.8, len(y))
    worse = y + rng.normal(0, 2.0, len(y))
    d, lo, hi = bootstrap_auc_difference(y, good, worse, users, 100, seed=0)
    assert d == pytest.approx(auc(y, good) - auc(y, worse))
    assert lo > 0 and lo <= d <= hi  # a real gap: the interval excludes 0
    # The same interval from a plain loop: resample users, score both models on the resampled rows.
    r = np.random.default_rng(0)
    uniq = np.unique(users)
    diffs = []
    for _ in range(100):
        pick = r.integers(0, len(uniq), len(uniq))
        rows = np.concatenate([np.flatnonzero(users == uniq[i]) for i in pick])
        diffs.append(auc(y[rows], good[rows]) - auc(y[rows], worse[rows]))
    assert (lo, hi) == pytest.approx((np.quantile(diffs, 0.025), np.quantile(diffs, 0.975)), abs=1e-9)
    # Two equally good models: the interval holds 0.
    twin = y + rng.normal(0, 0.8, len(y))
    _, lo2, hi2 = bootstrap_auc_difference(y, good, twin, users, 100, seed=0)
    assert lo2 <= 0 <= hi2
