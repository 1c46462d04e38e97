"""Channel tables and the quota merge against plain loops on tiny seeded data."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import scipy.sparse as sp

from features.candidates import (ChannelTables, channel_order, covisit_matrix, covisit_top, history_weights, merge_channels, mf_top,
                                 row_normalise, top_per_row)


def _log(seed: int = 0, n: int = 300, users: int = 20, items: int = 30):
    rng = np.random.default_rng(seed)
    return rng.integers(0, users, n), rng.integers(0, items, n), rng.permutation(n) * 1000, items


def test_covisit_matrix_matches_loop():
    user, item, ts, n_items = _log()
    got = covisit_matrix(user, item, ts, n_items, window=3).toarray()
    want = np.zeros((n_items, n_items))
    for u in np.unique(user):
        seq = item[user == u][np.argsort(ts[user == u])]
        for a in range(len(seq)):
            for b in range(a + 1, min(a + 4, len(seq))):
                if seq[a] != seq[b]:
                    want[seq[a], seq[b]] += 1 / (b - a)
                    want[seq[b], seq[a]] += 1 / (b - a)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_top_per_row_and_scores_match_loop():
    user, item, ts, n_items = _log(1)
    c = row_normalise(covisit_matrix(user, item, ts, n_items, window=5))
    np.testing.assert_allclose(np.asarray(c.sum(1)).ravel()[np.diff(c.indptr) > 0], 1.0, rtol=1e-5)
    t = top_per_row(c, 4)
    dense = c.toarray()
    for r in range(n_items):
        keep = sorted(np.flatnonzero(dense[r]), key=lambda j: (-dense[r, j], j))[:4]
        assert sorted(t[r].indices.tolist()) == sorted(keep)
    history = np.array([0, 0, 3, 7, 3, 11])  # padding 0, most recent last
    items, w = history_weights(history)
    assert items.tolist() == [3, 7, 3, 11]
    np.testing.assert_allclose(w, [0.25, 1 / 3, 0.5, 1.0], rtol=1e-6)
    score = defaultdict(float)
    td = t.toarray()
    for i, wi in zip(items, w):
        for j in np.flatnonzero(td[i]):
            score[j] += wi * td[i, j]
    want = sorted(score, key=lambda j: (-score[j], j))[:5]
    assert covisit_top(t, items, w, 5).tolist() == want


def test_merge_respects_quotas_order_blocks_and_dedup():
    lists = {"ann": np.array([5, 1, 2, 3, 9]), "covisit": np.array([2, 4, 4, 6, 7]), "trending": np.array([1, 8, 0])}
    blocked = np.zeros(10, bool)
    blocked[[3, 6]] = True
    rows, tags = merge_channels(lists, {"ann": 3, "covisit": 2, "trending": 5, "fresh": 4}, blocked)
    assert rows.tolist() == [5, 1, 2, 4, 7, 8, 0]
    assert tags.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert not blocked[[5, 1, 2, 4, 7, 8, 0]].any()  # the caller's mask is not modified


def test_merge_fills_what_the_channels_leave_from_the_fill_list():
    lists = {"ann": np.array([5, 1, 2, 3, 9, 4]), "covisit": np.array([2, 4])}
    blocked = np.zeros(10, bool)
    blocked[3] = True
    # Co-visitation finds 2 of its 4; the ANN (quota 1) fills the 3 missing, skipping taken and blocked rows.
    rows, tags = merge_channels(lists, {"covisit": 4, "ann": 1}, blocked, fill_from="ann")
    assert rows.tolist() == [2, 4, 5, 1, 9]
    assert [channel_order({"covisit": 4, "ann": 1}, "ann")[t] for t in tags] == ["covisit"] * 2 + ["ann"] * 3
    # A fill channel without a quota gets its own tag after the quotas' channels.
    rows, tags = merge_channels(lists, {"covisit": 3}, blocked, fill_from="ann")
    assert rows.tolist() == [2, 4, 5] and channel_order({"covisit": 3}, "ann")[tags[-1]] == "ann"
    # Without the fill the set stays short.
    assert merge_channels(lists, {"covisit": 3}, blocked)[0].tolist() == [2, 4]


def test_channel_tables_round_trip(tmp_path):
    user, item, ts, n_items = _log(2)
    cov = top_per_row(row_normalise(covisit_matrix(user, item, ts, n_items, 3)), 5)
    seen = sp.csr_matrix((np.ones(len(user), np.int8), (user, item)), shape=(20, n_items))
    seen.sum_duplicates()
    t = ChannelTables(cov, np.array([4, 2, 9]), np.array([7, 1]), seen)
    t.save(tmp_path / "c.npz")
    back = ChannelTables.load(tmp_path / "c.npz")
    np.testing.assert_allclose(back.covisit.toarray(), cov.toarray())
    assert back.trending.tolist() == [4, 2, 9] and back.fresh.tolist() == [7, 1]
    assert back.seen_rows(3).tolist() == sorted(set(item[user == 3].tolist()))
    assert back.seen_rows(-1).size == 0 and back.seen_rows(99).size == 0
    rank = back.list_rank("trending")  # position in the list, off-list rows last
    assert rank.shape == (n_items,) and rank[[4, 2, 9]].tolist() == [0, 1, 2]
    assert set(np.delete(rank, [4, 2, 9]).tolist()) == {3} and back.list_rank("fresh")[1] == 1


def test_mf_top_matches_a_full_sort_with_ties_to_the_lower_row():
    rng = np.random.default_rng(3)
    items = rng.integers(-2, 3, size=(60, 3)).astype(np.float32)  # small integers: many tied scores
    user = np.array([1.0, -1.0, 0.5], np.float32)
    blocked = rng.random(60) < 0.3
    score = items @ user
    free = [r for r in range(60) if not blocked[r]]
    expected = sorted(free, key=lambda r: (-score[r], r))
    for n in (1, 7, len(free), len(free) + 5):
        assert mf_top(user, items, blocked, n).tolist() == expected[:n]
    assert mf_top(np.zeros(3, np.float32), items, blocked, 5).size == 0
    assert mf_top(user, items, np.ones(60, bool), 5).size == 0
