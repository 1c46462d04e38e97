"""``python -m training evaluate-policy`` end to end: JSON, plots and a real MLflow run, in a scratch folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # The store explicitly: an earlier in-process mlflow.set_tracking_uri leaves MLFLOW_TRACKING_URI set.
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'runs' / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-m", "training", "evaluate-policy", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=env)


def test_evaluate_policy_cli_writes_json_plots_and_an_mlflow_run(synthetic_bundle: Path, tmp_path: Path):
    r = _run(["--bundle", str(synthetic_bundle), "--out", "out/policy.json", "--k", "10", "--max-users", "30",
              "--arm", "slots3:exposure.candidate_slots=3,exposure.placement=relevance"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "policy.json").read_text())
    assert {"engagement_only", "policy", "slots3"} <= set(result)
    assert set(result["relative_to_engagement_only"]) == {"policy", "slots3"}
    assert result["data"]["as_of"]["rows_before"] > 0 and "mf" in result["data"]["as_of"]  # retrieval as of the period
    assert result["policy_config"]["exposure"]["candidate_slots"] >= 0
    # One verdict line per arm, from the JSON's figures.
    for arm in ("policy", "slots3"):
        rel = result["relative_to_engagement_only"][arm]
        line = next(x for x in r.stdout.splitlines() if x.startswith(f"{arm}: creator Gini"))
        assert f"-> {result[arm]['creator_gini']:.3f} ({100 * rel['creator_gini']:+.1f}%)" in line
        assert f"dm {'met' if rel['passes_bar_dm'] else 'not met'}" in line
    for name in ("policy_lorenz.png", "policy_tradeoff.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["feedstack"], filter_string="tags.kind = 'policy-eval'")
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["metrics.slots3.creator_gini"] == pytest.approx(result["slots3"]["creator_gini"])
    assert row["metrics.policy.rel.ndcg_dm_at_10_long_view"] == pytest.approx(
        result["relative_to_engagement_only"]["policy"]["ndcg_dm@10_long_view"])


def test_evaluate_policy_cli_names_a_malformed_arm(synthetic_bundle: Path, tmp_path: Path):
    r = _run(["--bundle", str(synthetic_bundle), "--out", "p.json", "--no-mlflow", "--arm", "slots3"], tmp_path)
    assert r.returncode != 0 and "NAME:KEY=VALUE" in r.stderr
    r = _run(["--bundle", str(synthetic_bundle), "--out", "p.json", "--no-mlflow",
              "--arm", "x:exposure.candidate_slot=3"], tmp_path)
    assert r.returncode != 0 and "candidate_slot" in r.stderr
    assert not (tmp_path / "p.json").exists()
