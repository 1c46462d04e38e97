"""Choosing the served channel quotas by the page on validation: the shortlist, the choice rule, the bundle
amendment (re-checksummed, refused when damaged) and the CLI end to end on a copy of the synthetic bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.choose_channels import INCUMBENT, choose, parse_weights, shortlist
from features.bundle import amend_channel_quotas, verify_bundle
from features.contract import BundleError
from serving.bundle import load_bundle


def _sweep() -> dict:
    rows = [({"ann": 350, "covisit": 0, "trending": 50, "mf": 100}, 0.66),
            ({"ann": 400, "covisit": 0, "trending": 0, "mf": 100}, 0.65),
            ({"ann": 450, "covisit": 0, "trending": 0, "mf": 50}, 0.64),
            ({"ann": 350, "covisit": 150, "trending": 0, "mf": 0}, 0.50),
            ({"ann": 300, "covisit": 150, "trending": 50, "mf": 0}, 0.52)]
    return {"k": 500, "merged": [{"quotas": q, "recall@500": r} for q, r in rows]}


def test_shortlist_takes_the_best_mixes_and_each_channel_at_its_largest_share():
    got = shortlist(_sweep(), top=2)
    # The two best by recall, then per channel its largest quota's best mix (covisit 150: the 0.52 one;
    # trending 50 and mf 100 are in the top two already); zero quotas are dropped from the names.
    assert list(got) == ["ann350+trending50+mf100", "ann400+mf100", "ann300+covisit150+trending50"]
    assert got["ann300+covisit150+trending50"] == {"ann": 300, "covisit": 150, "trending": 50}
    assert shortlist(None, 3) == {} and shortlist({"k": 500, "merged": []}, 3) == {}


def test_choice_is_the_best_arm_by_the_primary_gain_with_a_paired_interval():
    rng = np.random.default_rng(0)
    per_user = {INCUMBENT: rng.random(200) * 0.1, "covisit": rng.random(200) * 0.1 + 0.02, "ann": rng.random(200) * 0.1}
    per_user["ann"][:5] = np.nan  # users without a positive of the primary gain
    per_user[INCUMBENT][:5] = np.nan
    per_user["covisit"][:5] = np.nan
    arms = {a: {"quotas": {a if a != INCUMBENT else "ann": 10}, "ndcg@20_long_view": float(np.nanmean(v))}
            for a, v in per_user.items()}
    result = {"k": 20, "gains": ["long_view", "click"], "arms": arms}
    c = choose(result, per_user)
    assert c["chosen"] == "covisit" and c["quotas"] == {"covisit": 10} and c["users"] == 195
    d = c["chosen_minus_incumbent"]
    assert d["difference"] == pytest.approx(arms["covisit"]["ndcg@20_long_view"] - arms[INCUMBENT]["ndcg@20_long_view"])
    assert d["ci"][0] > 0  # 0.02 better on 195 users: distinguishable
    assert d["comparisons"] == 2 and d["level"] == pytest.approx(0.975)  # Bonferroni over the two challengers
    # A tie keeps the incumbent.
    tied = {a: {**m, "ndcg@20_long_view": 0.05} for a, m in arms.items()}
    assert choose({**result, "arms": tied}, per_user)["chosen"] == INCUMBENT
    # A leader the interval cannot tell from the incumbent does not replace it.
    swing = 0.05 * np.where(np.arange(200) % 2, 1.0, -1.0)  # +0.002 on average, +-0.05 per user
    close = {**per_user, "covisit": per_user[INCUMBENT] + 0.002 + swing, "ann": per_user[INCUMBENT] - 0.01}
    arms_close = {a: {**m, "ndcg@20_long_view": float(np.nanmean(close[a]))} for a, m in arms.items()}
    c = choose({**result, "arms": arms_close}, close)
    assert c["leader"] == "covisit" and c["chosen"] == INCUMBENT and c["quotas"] == arms[INCUMBENT]["quotas"]
    assert c["leader_minus_incumbent"]["ci"][0] <= 0 and c["chosen_minus_incumbent"] is None


def test_the_leader_of_many_arms_needs_the_bonferroni_interval_to_replace_the_incumbent():
    from features.metrics import paired_difference

    # Ten challengers, all equal to the incumbent in truth; the best of them is searched for by seed so that
    # its plain 95% interval clears 0 (the winner's curse) while the interval at 1 - 0.05 / 10 does not.
    n = 1500
    for seed in range(200):
        rng = np.random.default_rng(seed)
        base = rng.random(n) * 0.1
        per_user = {INCUMBENT: base, **{f"arm{i}": base + rng.normal(0, 0.05, n) for i in range(10)}}
        means = {a: float(v.mean()) for a, v in per_user.items()}
        best = max(means, key=means.get)
        plain = paired_difference(per_user[best], base, seed=0)
        if best != INCUMBENT and plain["ci95"][0] > 0:
            break
    else:
        pytest.fail("no seed gave a lucky leader")
    arms = {a: {"quotas": {"ann": 10}, "ndcg@20_long_view": m} for a, m in means.items()}
    c = choose({"k": 20, "gains": ["long_view"], "arms": arms}, per_user)
    assert c["leader"] == best and c["chosen"] == INCUMBENT
    d = c["leader_minus_incumbent"]
    assert d["comparisons"] == 10 and d["level"] == pytest.approx(0.995) and d["ci"][0] <= 0 < plain["ci95"][0]
    # A clear winner among as many arms still replaces it.
    per_user["arm3"] = base + 0.02 + rng.normal(0, 0.05, n)
    arms["arm3"]["ndcg@20_long_view"] = float(per_user["arm3"].mean())
    assert choose({"k": 20, "gains": ["long_view"], "arms": arms}, per_user)["chosen"] == "arm3"


def test_retrieval_weights_are_parsed_or_refused_with_the_reason():
    from features.config import ConfigError

    assert parse_weights("0, 1,2.5,") == [0.0, 1.0, 2.5] and parse_weights("") == []
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        parse_weights("1,two")
    with pytest.raises(ConfigError, match="finite and >= 0"):
        parse_weights("1,-2")
    with pytest.raises(ConfigError, match="finite and >= 0"):
        parse_weights("inf")


def test_amending_the_quotas_rechecksums_and_leaves_every_other_file(synthetic_bundle: Path, tmp_path: Path):
    b = tmp_path / "bundle"
    shutil.copytree(synthetic_bundle, b)
    before = verify_bundle(b)["files"]
    amend_channel_quotas(b, {"covisit": 300, "ann": 200}, "a test", lambda m: m.setdefault("note", {}).update(x=1))
    after = verify_bundle(b)
    changed = {f for f in before if before[f] != after["files"][f]}
    assert changed == {"retrieval/retrieval.json"} and set(after["files"]) == set(before)
    assert after["metrics"]["note"] == {"x": 1}
    loaded = load_bundle(b)
    assert loaded.channel_quotas == {"covisit": 300, "ann": 200}
    assert json.loads((b / "retrieval" / "retrieval.json").read_text())["channels"]["chosen_by"] == "a test"
    # The source bundle shares no written file with the copy (hard links are replaced, not written through).
    assert verify_bundle(synthetic_bundle)["files"] == before
    assert not (tmp_path / "bundle.amend").exists() and not (tmp_path / "bundle.old").exists()


def test_a_damaged_bundle_or_unknown_channel_is_refused_and_left_as_is(synthetic_bundle: Path, tmp_path: Path):
    b = tmp_path / "bundle"
    shutil.copytree(synthetic_bundle, b)
    with pytest.raises(BundleError, match="known channels"):
        amend_channel_quotas(b, {"ann": 100, "nope": 5}, "x")
    with pytest.raises(BundleError, match="known channels"):
        amend_channel_quotas(b, {"ann": 0}, "x")
    with (b / "features" / "vocab.json").open("a") as f:
        f.write(" ")
    manifest = (b / "manifest.json").read_text()
    with pytest.raises(BundleError, match="checksum mismatch"):
        amend_channel_quotas(b, {"ann": 500}, "x")
    assert (b / "manifest.json").read_text() == manifest  # not re-signed


def test_choose_channels_cli_writes_the_choice_into_the_bundle_and_registers_it(
        synthetic_config: Path, synthetic_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "out"
    shutil.copytree(synthetic_bundle, out / "bundle")
    (out / "metrics.json").write_text(json.dumps(verify_bundle(synthetic_bundle)["metrics"]))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    base = [sys.executable, "-m", "evaluation", "choose-channels", "--config", str(synthetic_config),
            "--set", f"output_dir={out}", "--k", "10", "--max-users", "20", "--top", "2", "--no-progress"]
    repo = Path(__file__).resolve().parents[2]
    dry = subprocess.run(base + ["--dry-run"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert verify_bundle(out / "bundle")["files"] == verify_bundle(synthetic_bundle)["files"]  # nothing written
    # Its plot goes beside the real choice's, never over it.
    assert (out / "channel_choice_dry_run.png").is_file() and not (out / "channel_choice.png").exists()
    r = subprocess.run(base, cwd=repo, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    choice = json.loads((out / "metrics.json").read_text())["retrieval"]["channels"]["page_choice"]
    metric = choice["metric"]
    assert metric == "ndcg@10_long_view" and choice["users"] > 0
    # The arms: the incumbent, each channel alone and the shortlisted mixes; the leader is the best, and it
    # serves only if it beat the incumbent with evidence.
    assert {INCUMBENT, "ann", "covisit", "trending", "fresh", "mf"} <= set(choice["arms"])
    assert choice["arms"][choice["leader"]][metric] == max(m[metric] for m in choice["arms"].values())
    assert choice["chosen"] in (choice["leader"], INCUMBENT)
    assert (choice["chosen"] == choice["leader"]) == (choice["leader"] == INCUMBENT
                                                      or choice["leader_minus_incumbent"]["ci"][0] > 0)
    assert load_bundle(out / "bundle").channel_quotas == choice["quotas"]
    # First the retrieval score's weight in the page's fusion: every weight tried, the choice written into
    # the bundle, and every quota arm served with it.
    wc = choice["retrieval_weight_choice"]
    before = load_bundle(synthetic_bundle).page_retrieval_weight  # served as the incumbent, not twice
    assert wc["arms"][INCUMBENT]["retrieval_weight"] == before
    assert {f"retrieval_weight_{w:g}" for w in (0, 1, 2, 4, 8, 16) if w != before} <= set(wc["arms"])
    assert f"retrieval_weight_{before:g}" not in wc["arms"]
    assert load_bundle(out / "bundle").page_retrieval_weight == wc["retrieval_weight"]
    assert {m["retrieval_weight"] for m in choice["arms"].values()} == {wc["retrieval_weight"]}
    assert verify_bundle(out / "bundle")["metrics"]["retrieval"]["channels"]["page_choice"] == choice
    assert (out / "channel_choice.png").is_file()
    assert f"{choice['arms'][choice['leader']][metric]:.4f}" in r.stdout
    # Each arm's creator exposure (computed in serving.offline_channels, checked there) is kept and printed.
    for m in (*choice["arms"].values(), *wc["arms"].values()):
        assert 0.0 < m["creator_gini_catalogue"] <= 1.0
    assert f"{choice['arms'][choice['leader']][metric]:.4f} | {choice['arms'][choice['leader']]['creator_gini_catalogue']:.3f} |" in r.stdout.replace("**", "")
    assert (out / "channel_choice.png").stat().st_size > 1000
    import mlflow

    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["feedstack"], filter_string="tags.kind = 'channel-choice'")
    assert len(runs) == 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs.iloc[0]["run_id"])}
    assert {"channel_choice.json", "channel_choice.png", "channel_choice.md"} <= artifacts
    versions = mlflow.MlflowClient().search_model_versions("name = 'feedstack'")
    assert len(versions) == 1 and versions[0].run_id == runs.iloc[0]["run_id"]


def test_quotas_fixed_in_the_config_leave_nothing_to_choose(synthetic_config: Path, synthetic_bundle: Path,
                                                             tmp_path: Path):
    out = tmp_path / "out"
    shutil.copytree(synthetic_bundle, out / "bundle")
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    manifest["config"].setdefault("serving", {})["channel_quotas"] = {"ann": 500}
    (out / "bundle" / "manifest.json").write_text(json.dumps(manifest))
    r = subprocess.run([sys.executable, "-m", "evaluation", "choose-channels", "--config", str(synthetic_config),
                        "--set", f"output_dir={out}", "--no-mlflow", "--no-progress"],
                       cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "nothing to choose" in r.stdout, r.stderr[-2000:]
    assert load_bundle(out / "bundle").channel_quotas == load_bundle(synthetic_bundle).channel_quotas


def test_a_policy_config_is_served_instead_of_the_recipe_in_a_dry_run_only(synthetic_config: Path,
                                                                           synthetic_bundle: Path, tmp_path: Path):
    """``--policy-config``: what the choice would be under another policy, without a refit. With the page's
    retrieval weight fixed there (3), no weight is tried and every quota arm serves at 3; without --dry-run it
    is refused before anything runs, since the bundle would go on serving its recipe's policy."""
    import yaml

    out = tmp_path / "out"
    shutil.copytree(synthetic_bundle, out / "bundle")
    raw = yaml.safe_load(synthetic_config.read_text())
    raw.setdefault("policy", {}).setdefault("fusion", {})["retrieval_weight"] = 3
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(raw))
    base = [sys.executable, "-m", "evaluation", "choose-channels", "--config", str(synthetic_config),
            "--set", f"output_dir={out}", "--k", "10", "--max-users", "20", "--top", "1", "--no-progress",
            "--no-mlflow", "--policy-config", str(policy)]
    repo = Path(__file__).resolve().parents[2]
    refused = subprocess.run(base, cwd=repo, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--policy-config needs --dry-run" in refused.stderr
    r = subprocess.run(base + ["--dry-run"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith("| ") and "channel" not in line]
    arms = [cells for cells in rows if len(cells) > 4 and cells[1].strip().strip("*") not in ("arm", "")]
    assert arms and all(cells[3].strip() == "3" for cells in arms)  # every arm at the policy config's weight
    assert "retrieval_weight_" not in r.stdout
    assert verify_bundle(out / "bundle")["files"] == verify_bundle(synthetic_bundle)["files"]  # nothing written
    # Its plot goes beside the real choice's, never over it.
    assert (out / "channel_choice_dry_run.png").is_file() and not (out / "channel_choice.png").exists()
    # The recipe's own policy (no fixed weight) does try the weights.
    recipe = subprocess.run(base[:-2] + ["--dry-run"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert recipe.returncode == 0 and "retrieval_weight_" in recipe.stdout, recipe.stderr[-3000:]
