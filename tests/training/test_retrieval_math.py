"""Vectorised retrieval math against plain loops on tiny seeded random data."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pandas as pd
import pytest
import torch

from training.retrieval.index import build_index, overlap_recall, recall_vs_exact
from training.retrieval.metrics import make_eval_set, ranked_hits, recall_ndcg
from training.retrieval.model import sampled_softmax_loss


def _loop_metrics(scores, exclude, targets, ks):
    """Reference: per user, sort the non-excluded candidates, count hits by hand."""
    rec = {k: [] for k in ks}
    ndcg = {k: [] for k in ks}
    for u in range(scores.shape[0]):
        order = sorted((j for j in range(scores.shape[1]) if j not in exclude[u]), key=lambda j: (-scores[u, j], j))
        order += sorted(exclude[u])  # excluded items go last, never hits unless also targets
        t = targets[u]
        for k in ks:
            top = order[:k]
            hits = [1.0 if j in t and j not in exclude[u] else 0.0 for j in top]
            rec[k].append(sum(hits) / len(t))
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(t))))
            ndcg[k].append(dcg / idcg)
    return {**{f"recall@{k}": np.mean(v) for k, v in rec.items()}, **{f"ndcg@{k}": np.mean(v) for k, v in ndcg.items()}}


def test_recall_ndcg_match_plain_loop():
    rng = np.random.default_rng(3)
    n_users, n_items = 40, 60
    # Training rows (shown items) and evaluated rows (positives), over raw ids.
    seen = pd.DataFrame({"user_id": rng.integers(0, n_users, 300).astype(str),
                         "item_id": rng.integers(0, n_items, 300).astype(str)})
    rows = pd.DataFrame({"user_id": rng.integers(0, n_users + 5, 200).astype(str),  # some unseen users
                         "item_id": rng.integers(0, n_items + 5, 200).astype(str),  # some unseen items
                         "long_view": rng.random(200) < 0.5})
    catalogue = np.array([str(i) for i in range(n_items + 10)])
    es = make_eval_set(seen, rows, catalogue, "long_view")
    assert es.n_users > 10
    scores = rng.normal(size=(es.n_users, len(es.candidates))).round(1)  # rounding creates ties
    ks = [1, 5, 20, 200]  # 200 > candidates: the excluded tail is ranked but never a hit
    hits = ranked_hits(lambda u: scores[u], es, max(ks), chunk=7)
    got = recall_ndcg(hits, np.asarray(es.targets.sum(1)).ravel(), ks, ks)

    # Reference built from the raw rows, not from the EvalSet matrices.
    cand = list(es.candidates)
    pos_of = {catalogue[c]: p for p, c in enumerate(cand)}
    seen_users = set(seen["user_id"])
    exclude, targets = [], []
    for u in es.user_ids:
        exclude.append({pos_of[i] for i in seen.loc[seen["user_id"] == u, "item_id"] if i in pos_of})
        r = rows[(rows["user_id"] == u) & rows["long_view"]]
        targets.append({pos_of[i] for i in r["item_id"] if i in pos_of})
    assert all(u in seen_users for u in es.user_ids) and all(targets)
    want = _loop_metrics(scores, exclude, targets, ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def _loop_loss(u, v, keys, log_q, temperature):
    b = u.shape[0]
    total = 0.0
    for i in range(b):
        logits = []
        for j in range(v.shape[0]):
            if j != i and keys[j] == keys[i]:
                continue  # another copy of the user's own positive is not a negative
            logits.append((j, float(u[i] @ v[j]) / temperature - float(log_q[j])))
        m = max(z for _, z in logits)
        lse = m + math.log(sum(math.exp(z - m) for _, z in logits))
        total += lse - dict(logits)[i]
    return total / b


def test_sampled_softmax_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    b, m, d = 6, 4, 5
    u = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(b + m, d, generator=g), dim=1)
    keys = torch.tensor([0, 1, 1, 2, 3, 0, 7, 1, 8, 9])  # repeats in-batch and among the extra negatives
    log_q = torch.log(torch.rand(b + m, generator=g) + 0.1)
    got = sampled_softmax_loss(u, v, keys, log_q, 0.2)
    want = _loop_loss(u.numpy(), v.numpy(), keys.tolist(), log_q.numpy(), 0.2)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # The correction matters: without it the loss differs.
    plain = sampled_softmax_loss(u, v, keys, torch.zeros(b + m), 0.2)
    assert abs(plain.item() - got.item()) > 1e-3


def test_faiss_recall_vs_exact_is_measured_correctly():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    flat, _ = build_index(x, "Flat")
    assert recall_vs_exact(flat, x, q, 10) == pytest.approx(1.0)
    # A deliberately weak HNSW search: recall must come out below 1 and equal a hand count.
    hnsw, params = build_index(x, "HNSW8", ef_search=10)
    assert params == {"efSearch": 10}
    r = recall_vs_exact(hnsw, x, q, 10)
    _, got = hnsw.search(q, 10)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    hand = np.mean([len(set(a) & set(t)) / 10 for a, t in zip(got, truth)])
    assert r == pytest.approx(hand)
    assert r < 1.0
    assert overlap_recall(np.array([[1, 2, -1]]), np.array([[2, 3, 4]])) == pytest.approx(1 / 3)


def test_bad_factory_string_is_a_value_error():
    with pytest.raises(ValueError, match="not a valid FAISS factory"):
        build_index(np.zeros((10, 4), np.float32), "NoSuchIndex")
    with pytest.raises(ValueError, match="IVF lists"):
        build_index(np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32), "IVF64,Flat")


def test_top_k_stable_equals_a_stable_full_sort():
    from training.retrieval.metrics import top_k_stable

    rng = np.random.default_rng(5)
    for _ in range(100):
        s = rng.integers(0, 4, (6, 30)).astype(float)  # many ties
        s[rng.random(s.shape) < 0.2] = -np.inf
        k = int(rng.integers(1, 31))
        np.testing.assert_array_equal(top_k_stable(s, k), np.argsort(-s, axis=1, kind="stable")[:, :k])


def test_paired_difference_interval_follows_the_per_user_differences():
    from features.metrics import paired_difference

    rng = np.random.default_rng(0)
    a = rng.random(2000)
    shifted = paired_difference(a + 0.01 + rng.normal(0, 0.05, 2000), a, seed=0)
    assert shifted["ci95"][0] > 0 and shifted["ci95"][0] < shifted["difference"] < shifted["ci95"][1]
    noise = paired_difference(a + rng.normal(0, 0.05, 2000), a, seed=0)
    assert noise["ci95"][0] < 0 < noise["ci95"][1]
    # Pairing: a large shared per-user spread cancels, so the interval is as narrow as the differences'.
    assert shifted["ci95"][1] - shifted["ci95"][0] < 4 * 1.96 * 0.05 / np.sqrt(2000)


def _encode_one(enc, h: torch.Tensor) -> torch.Tensor:
    """Reference for one user: the summary token and the real items only (no mask), one head at a time."""
    d = h.shape[1]
    hd = d // enc.heads
    x = torch.cat([enc.summary[0], h]) + enc.position[0, : h.shape[0] + 1]
    for blk in enc.blocks:
        qkv = blk["qkv"](blk["norm1"](x))
        heads = []
        for j in range(enc.heads):
            q, k, v = (qkv[:, i * d + j * hd: i * d + (j + 1) * hd] for i in range(3))
            heads.append(torch.softmax(q @ k.T / math.sqrt(hd), dim=1) @ v)
        x = x + blk["out"](torch.cat(heads, dim=1))
        x = x + blk["ff"](blk["norm2"](x))
    return enc.norm(x[0])


def test_history_encoder_matches_a_per_user_loop_over_real_items_only():
    from training.retrieval.model import HistoryEncoder

    torch.manual_seed(0)
    length, d = 6, 8
    enc = HistoryEncoder(d, length, layers=2, heads=2, dropout=0.0).eval()
    h = torch.randn(4, length, d)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [0] * 6], dtype=torch.float32)
    with torch.no_grad():
        got = enc(h, mask)
        for u in range(4):
            real = mask[u] > 0
            # left-padded: the real items keep their positions, which the reference re-derives by offset
            pos = torch.nonzero(real).flatten()
            ref_enc = HistoryEncoder(d, length, 2, 2, 0.0).eval()
            ref_enc.load_state_dict(enc.state_dict())
            ref_enc.position.data = torch.cat([enc.position[:, :1], enc.position[:, 1:][:, pos]], dim=1)
            want = _encode_one(ref_enc, h[u, real])
            torch.testing.assert_close(got[u], want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all() and not torch.allclose(got[2], got[3])  # an empty history is finite too
    with pytest.raises(ValueError, match="divisible"):
        HistoryEncoder(9, length, 1, 2, 0.0)


def test_prior_sweep_picks_the_window_and_beta_that_rank_the_targets_and_matches_a_plain_loop():
    """Two prior windows: a long one that knows old hits, a recent one that knows what the period's users
    turn to. The sweep must score every (window, beta) like a plain ranking and pick the recent window."""
    from training.retrieval.task import PriorChoice, prior_sweep

    rng = np.random.default_rng(7)
    n_users, n_items = 60, 80
    seen = pd.DataFrame({"user_id": rng.integers(0, n_users, 200).astype(str),
                         "item_id": rng.integers(0, n_items, 200).astype(str)})
    recent_hits = rng.choice(n_items, 10, replace=False)
    rows = pd.DataFrame({"user_id": np.repeat(np.arange(n_users), 3).astype(str),
                         "item_id": rng.choice(recent_hits, 3 * n_users).astype(str), "long_view": True})
    catalogue = np.array([str(i) for i in range(n_items)])
    es = make_eval_set(seen, rows, catalogue, "long_view")
    uv = rng.normal(size=(es.n_users, 4)).astype(np.float32)
    iv = rng.normal(size=(len(es.candidates), 4)).astype(np.float32)
    long_window = rng.random(len(es.candidates)).astype(np.float32) * 3  # unrelated to the period
    recent = np.zeros(len(es.candidates), np.float32)
    recent[np.isin(catalogue[es.candidates], recent_hits.astype(str))] = 3.0
    ks = [5, 10]
    best, sweep = prior_sweep(es, uv, iv, {0.0: long_window, 2.0: recent}, [0.0, 0.5, 4.0], ks, [])
    # beta 0 is scored once (the window does not matter without a prior), every other pair once
    assert list(sweep) == [PriorChoice(0.0, 0.0), PriorChoice(0.0, 0.5), PriorChoice(0.0, 4.0),
                           PriorChoice(2.0, 0.5), PriorChoice(2.0, 4.0)]
    assert best == PriorChoice(2.0, 4.0)
    n_pos = np.asarray(es.targets.sum(1)).ravel()
    for choice, got in sweep.items():
        prior = {0.0: long_window, 2.0: recent}[choice.days]
        scores = uv @ iv.T + choice.beta * prior[None, :]
        want = recall_ndcg(ranked_hits(lambda u: scores[u], es, max(ks)), n_pos, ks, [])
        assert got == pytest.approx(want)
    assert sweep[best]["recall@5"] > sweep[PriorChoice(0.0, 4.0)]["recall@5"] + 0.2
    # One window: the metrics name each pair by its beta alone, as before windows were a grid.
    assert [c.key(True) for c in sweep][:3] == ["0.0", "0.5", "4.0"] and best.key(False) == "2d:4.0"
    only, _ = prior_sweep(es, uv, iv, None, [0.0, 0.5], ks, [])
    assert only == PriorChoice(0.0, 0.0)
