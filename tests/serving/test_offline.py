"""The offline policy evaluation runs the service's policy over test users and reports its promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.bundle import load_bundle
from serving.config import ServeSettings
from serving.offline import evaluate_policy, lorenz
from serving.policy import PolicyConfig, QualityStep


def test_offline_policy_vs_engagement_only(serving_bundle: Path):
    if not (serving_bundle / "features" / "interactions.parquet").exists():
        pytest.skip("this bundle ships no interactions.parquet")
    bundle = load_bundle(serving_bundle)
    out = evaluate_policy(bundle, ServeSettings(), k=10, max_users=80)
    assert out["users"] > 10
    for arm in ("policy", "engagement_only"):
        assert out[arm]["governance_leaks"] == 0
        assert 0 <= out[arm]["creator_gini"] <= 1 and 0 < out[arm]["coverage"] <= 1
        assert out[arm]["ndcg@10_long_view"] is not None
    # With quality support as the only extra step, the page's high-quality share can only go up.
    quality_only = PolicyConfig.engagement_only()
    quality_only.quality = QualityStep(min_share=0.5)
    q = evaluate_policy(bundle, ServeSettings(policy=quality_only), k=10, max_users=80)
    assert q["policy"]["quality_share"] >= q["engagement_only"]["quality_share"]
    assert q["policy"]["governance_leaks"] == 0


def test_lorenz_curve_ends():
    assert lorenz([1, 1, 1, 1], 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lorenz([0, 0, 0, 4], 3)[1] == 0.0
