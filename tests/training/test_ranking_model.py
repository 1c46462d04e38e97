"""Ranker modules: shapes, gates against a loop, the D2Q watch-time round trip, ONNX parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from features.config import ConfigError
from training.onnx_export import check_parity, export_onnx
from training.ranking.config import RankingConfig
from training.ranking.data import FeatureLayout
from training.ranking.model import (
    GatedLevel, Gates, NumericNormalizer, Ranker, RankerScorer, RankerSpec, RequestScorer, embedding_dims,
)
from training.ranking.export import random_inputs, request_shaped
from training.ranking.watch_time import WatchTimeDecoder, WatchTimeQuantiles

HEADS = ["click", "like", "hate", "watch_time"]
SIZES = [50, 3, 7, 120, 30, 5, 25]  # user, user attr, user attr, item, creator, item attr, hour
N_NUM = 5


def layout() -> FeatureLayout:
    cols = [f"c{i}_idx" for i in range(len(SIZES))]
    vocabs = ["user_id", "a", "b", "item_id", "creator_id", "c", "hour"]
    num = ["r1", "r2", "n1", "is_fan", "duration_ms"]
    return FeatureLayout(cols, vocabs, SIZES, ["x"] * len(SIZES), num, ["x"] * N_NUM, "history", 6, "item_id")


def make_spec(arch: str, levels: int = 1) -> RankerSpec:
    return RankerSpec(SIZES, embedding_dims(SIZES, 8, 3, 20), item_position=3, n_num=N_NUM, heads=HEADS,
                      architecture=arch, expert_hidden=[16, 12], num_experts=3, shared_experts=2, task_experts=1,
                      ple_levels=levels, tower_hidden=8, dropout=0.0)


def num_reference(n: int = 400) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([rng.random(n) * 0.1, rng.random(n), rng.poisson(30, n), rng.integers(0, 2, n),
                     rng.lognormal(10, 1, n)], axis=1).astype(np.float32)


def wtq_fixture() -> WatchTimeQuantiles:
    rng = np.random.default_rng(1)
    dur = rng.lognormal(10, 1, 5000)
    watch = dur * rng.beta(0.8, 1.5, 5000) * np.where(rng.random(5000) < 0.1, 0, 1)
    return WatchTimeQuantiles.fit(dur, watch, 8, 41)


@pytest.mark.parametrize("arch,levels", [("mmoe", 1), ("ple", 1), ("ple", 2)])
@torch.no_grad()
def test_forward_shapes_and_gates(arch, levels):
    torch.manual_seed(0)
    model = Ranker(make_spec(arch, levels)).eval()
    inputs = random_inputs(layout(), num_reference(), seed=0)(11)
    logits = model(*inputs.values())
    assert logits.shape == (11, len(HEADS))
    x = torch.cat([model.embedding(inputs["cat"], inputs["hist"]), model.numeric(inputs["num"])], dim=1)
    for i, level in enumerate(model.levels):
        g = level.gates(x if x.dim() == 2 else x[: level.n_gates])
        n_gates = len(HEADS) + (1 if arch == "ple" and i < levels - 1 else 0)
        assert g.shape == (n_gates, 11, level.experts.n)
        torch.testing.assert_close(g.sum(-1), torch.ones(n_gates, 11))
        assert float((g * (level.gates.mask_add < 0)).max()) < 1e-6  # masked experts get no weight
        x = level(x)
        assert x.shape == (n_gates, 11, 12)


def test_gated_level_matches_expert_loop():
    torch.manual_seed(1)
    level = GatedLevel(10, [6, 4], 0.0, [0, 0, 0], torch.ones(2, 3)).eval()
    x = torch.randn(9, 10)
    out = level(x)
    gates = level.gates(x)
    for t in range(2):
        expect = torch.zeros(9, 4)
        for k in range(3):
            h = x
            for w, b in zip(level.experts.weights, level.experts.biases):
                h = torch.relu(h @ w[k] + b[k, 0])
            expect += gates[t, :, k : k + 1] * h
        torch.testing.assert_close(out[t], expect, rtol=1e-5, atol=1e-6)


def test_ple_gate_mask_only_own_and_shared_experts():
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    gates = Gates(2, 5, mask)
    with torch.no_grad():
        gates.weight.normal_()
    g = gates(torch.randn(7, 5))
    assert float(g[0, :, 1].max()) < 1e-6 and float(g[1, :, 0].max()) < 1e-6
    assert float(g[0, :, 0].min()) > 0 and float(g[1, :, 2].min()) > 0


def test_watch_time_quantile_round_trip():
    rng = np.random.default_rng(2)
    dur = rng.lognormal(10, 1, 20000)
    watch = dur * rng.beta(0.8, 1.5, 20000)
    wtq = WatchTimeQuantiles.fit(dur, watch, 10, 101)
    q = wtq.encode(dur, watch)
    assert q.min() >= 0 and q.max() <= 1
    np.testing.assert_allclose(wtq.decode(dur, q), watch, rtol=1e-6, atol=1e-3)
    # Debiased: the target is ~uniform inside every bucket and nearly uncorrelated with length,
    # while raw watch time is strongly correlated with it.
    b = wtq.bucket(dur)
    for k in np.unique(b):
        assert abs(q[b == k].mean() - 0.5) < 0.05
    assert abs(np.corrcoef(q, np.log(dur))[0, 1]) < 0.1 < np.corrcoef(np.log1p(watch), np.log(dur))[0, 1]
    # The exported torch decoder agrees with numpy.
    levels = rng.random(500)
    got = WatchTimeDecoder(wtq)(torch.tensor(dur[:500], dtype=torch.float32), torch.tensor(levels, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), wtq.decode(dur[:500], levels), rtol=1e-4)
    assert WatchTimeQuantiles.from_json(wtq.to_json()).encode(dur[:50], watch[:50]) == pytest.approx(q[:50], abs=1e-3)


def test_numeric_normalizer_handles_nan_and_heavy_tails():
    ref = num_reference()
    norm = NumericNormalizer(N_NUM)
    stats = NumericNormalizer.statistics(ref)
    assert stats["log_mask"].tolist() == [0, 0, 1, 0, 1]  # counts and durations, not rates or flags
    norm.set_statistics(stats)
    z = norm(torch.from_numpy(ref)).numpy()
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    x = torch.from_numpy(ref[:3].copy())
    x[0, 2] = float("nan")
    assert float(norm(x)[0, 2]) == 0.0


@pytest.mark.parametrize("arch,levels", [("mmoe", 1), ("ple", 2)])
def test_onnx_parity(arch, levels, tmp_path: Path):
    torch.manual_seed(2)
    model = Ranker(make_spec(arch, levels))
    model.numeric.set_statistics(NumericNormalizer.statistics(num_reference()))
    model.set_head_bias(np.array([0.4, 0.02, 0.001, 0.5]))
    scorer = RankerScorer(model, 3, wtq_fixture(), duration_position=4).eval()
    make = random_inputs(layout(), num_reference(), seed=0)
    path = export_onnx(scorer, make(4), tmp_path / "r.onnx", scorer.output_names)
    report = check_parity(scorer, path, random_inputs(layout(), num_reference(), seed=11), batch_sizes=(1, 9, 300))
    assert report.outputs == ["scores", "watch_time_s"]
    assert report.max_abs_diff < 1e-4


@pytest.mark.parametrize("arch,levels,const_cat,const_num", [
    # user, its two attributes, hour; the fan flag (per user here)
    ("mmoe", 1, [0, 1, 2, 6], [3]), ("ple", 2, [0, 1, 2, 6], [3]),
    # every narrow column the request's (a width group without a candidate column), no request numeric
    ("mmoe", 1, [0, 1, 2, 5, 6], []),
    # nothing shared but the history
    ("ple", 1, [], [])])
def test_request_graph_equals_the_scorer_on_one_users_candidates(arch, levels, const_cat, const_num, tmp_path: Path):
    torch.manual_seed(4)
    model = Ranker(make_spec(arch, levels))
    model.numeric.set_statistics(NumericNormalizer.statistics(num_reference()))
    scorer = RankerScorer(model, 3, wtq_fixture(), duration_position=4).eval()
    scorer.calib_scale.copy_(torch.tensor([1.2, 0.8, 1.0, 1.1]))
    request = RequestScorer(scorer, const_cat, const_num).eval()
    make = request_shaped(random_inputs(layout(), num_reference(), seed=5), const_cat, const_num)
    with torch.inference_mode():
        for b in (1, 2, 57):
            x = make(b)
            for full, fast in zip(scorer(*x.values()), request(*x.values())):
                np.testing.assert_allclose(fast.numpy(), full.numpy(), rtol=1e-5, atol=1e-6)
    # Exported, the request graph keeps parity with the full scorer on request-shaped inputs.
    path = export_onnx(request, make(4), tmp_path / "request.onnx", scorer.output_names)
    assert check_parity(scorer, path, make, batch_sizes=(1, 9, 300)).ok(1e-4)
    # Rows that do not share the user's history are not what it computes: the full graph stays for those.
    mixed = random_inputs(layout(), num_reference(), seed=6)(40)
    with torch.inference_mode():
        assert not np.allclose(request(*mixed.values())[0].numpy(), scorer(*mixed.values())[0].numpy(), atol=1e-4)


def test_request_graph_refuses_a_request_constant_item_column():
    scorer = RankerScorer(Ranker(make_spec("mmoe")), 3, wtq_fixture(), duration_position=4).eval()
    with pytest.raises(ValueError, match="item id column cannot be request-constant"):
        RequestScorer(scorer, [0, 3], [])


def test_shared_history_pools_equal_the_broadcast_pools():
    """The request graph's matmul form of the history pools (one history for every candidate) computes what
    the training form computes, for a partly padded and an empty history."""
    from training.ranking.model import FeatureEmbedding

    torch.manual_seed(0)
    emb = FeatureEmbedding([100, 50, 7], [16, 16, 4], 0)
    item_e = torch.randn(300, 16)
    for n_items in (12, 0):
        hist = torch.zeros(1, 20, dtype=torch.long)
        hist[0, :n_items] = torch.randint(1, 100, (n_items,))
        hist_e = torch.randn(1, 20, 16)
        for a, b in zip(emb.shared_pools(hist, hist_e, item_e), emb.pools(hist, hist_e, item_e)):
            torch.testing.assert_close(a.expand_as(b), b, rtol=1e-5, atol=1e-6)


def test_out_of_vocabulary_indices_read_oov_row():
    torch.manual_seed(3)
    model = Ranker(make_spec("mmoe")).eval()
    inputs = random_inputs(layout(), num_reference(), seed=0)(4)
    oov = {k: v.clone() for k, v in inputs.items()}
    oov["cat"][:, 3] = 10_000  # beyond the item vocab
    zero = {k: v.clone() for k, v in inputs.items()}
    zero["cat"][:, 3] = 0
    torch.testing.assert_close(model(*oov.values()), model(*zero.values()))


def test_config_names_heads_it_does_not_know():
    rc = RankingConfig(scenarios={"feed": {"click": 1.0, "clik": 2.0}})
    with pytest.raises(ConfigError, match="scenarios.feed names 'clik'"):
        rc.resolve_heads(["click", "like"], None)
    with pytest.raises(ConfigError, match="loss_weights names 'watch_time'"):
        RankingConfig(loss_weights={"watch_time": 2.0}, scenarios={}).resolve_heads(["click"], None)
    assert RankingConfig(scenarios={}).resolve_heads(["click"], "watch_time") == [("click", "binary"), ("watch_time", "watch_time")]


def test_platt_recovers_scale_and_bias_and_keeps_order():
    from training.ranking.pipeline import platt

    rng = np.random.default_rng(4)
    x = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-(0.5 * x - 3.0)))).astype(float)  # rare positives
    a, b = platt(x, y)
    assert a == pytest.approx(0.5, abs=0.08) and b == pytest.approx(-3.0, abs=0.25)
    assert platt(x, np.zeros_like(x)) == (1.0, 0.0)


class _TwoOutputs(torch.nn.Module):
    """A probability and a large-scale output (like watch seconds), each scaled by its own factor."""

    def __init__(self, prob_shift: float = 0.0, scale_factor: float = 1.0):
        super().__init__()
        self.prob_shift, self.scale_factor = prob_shift, scale_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(x) + self.prob_shift, 1000.0 * (x.abs() + 1.0) * self.scale_factor


def test_parity_is_absolute_for_probabilities_and_relative_for_large_outputs(tmp_path: Path):
    path = export_onnx(_TwoOutputs(), {"x": torch.randn(3, 4)}, tmp_path / "m.onnx", ["p", "seconds"])
    make = lambda b: {"x": torch.randn(b, 4, generator=torch.Generator().manual_seed(b))}  # noqa: E731
    # Seconds off by one part in 1e6: over 1e-4 in absolute terms, within tolerance relative to its scale.
    rel = check_parity(_TwoOutputs(scale_factor=1 + 1e-6), path, make)
    assert rel.max_abs_diff > 1e-4 and rel.ok(1e-4), rel
    # A probability off by 1e-3 fails whatever the other output does.
    bad = check_parity(_TwoOutputs(prob_shift=1e-3), path, make)
    assert not bad.ok(1e-4) and bad.per_output["p"] == pytest.approx(1e-3, rel=1e-2)
    assert "'p'" in bad.describe()


def test_val_score_reads_only_the_monitored_heads_and_history_keeps_all():
    from training.ranking.metrics import auc
    from training.ranking.task import RankingTask

    rng = np.random.default_rng(5)
    n = 400
    y = (rng.random((n, len(HEADS))) < 0.3).astype(np.float32)
    logits = torch.from_numpy(rng.normal(size=(n, len(HEADS))).astype(np.float32)) + torch.from_numpy(y) * 0.5
    kinds = ["binary", "binary", "binary", "watch_time"]
    for monitor, expect_heads in ((None, [0, 1, 2]), ([1], [1])):
        task = RankingTask(Ranker(make_spec("mmoe")), kinds, [1.0] * 4, 1e-3, names=HEADS, monitor=monitor)
        logged = {}
        task.log = lambda name, value, **kw: logged.__setitem__(name, value)  # no trainer in a unit test
        task._val.append((logits, torch.from_numpy(y)))
        task.on_validation_epoch_end()
        p = torch.sigmoid(logits).numpy()
        want = np.mean([auc(y[:, t], p[:, t]) for t in expect_heads])
        assert np.isclose(logged["ranking/val_score"], want)
        assert set(task.val_history[-1]) == {"click", "like", "hate"}


def test_uncertainty_weighting_learns_a_log_variance_per_head():
    from training.ranking.task import RankingTask

    task = RankingTask(Ranker(make_spec("mmoe")), ["binary"] * 3 + ["watch_time"], [1.0] * 4, 1e-3, uncertainty=True)
    assert task.log_var is not None and task.log_var.shape == (4,)
    assert any(p is task.log_var for p in task.configure_optimizers().param_groups[0]["params"])
    assert "log_var" not in dict(task.model.named_parameters())  # not part of the exported model


def test_config_refuses_negative_hybrid_and_gbdt_settings():
    with pytest.raises(ConfigError, match="ranking.hybrid_min_positives must be >= 0"):
        RankingConfig(hybrid_min_positives=-1)
    with pytest.raises(ConfigError, match="ranking.gbdt_max_categorical must be >= 0"):
        RankingConfig(gbdt_max_categorical=-5)
