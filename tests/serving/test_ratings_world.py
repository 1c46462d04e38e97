"""A log of a really different shape, by config alone: MovieLens-style ratings (TSV without a header, one
binary signal derived from the rating, no creators, durations, follows or context, genres as flag columns
and keywords in a ';'-separated text column) through build -> fit -> bundle -> HTTP service ->
evaluate-policy, with the real CLIs, the production refit included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from features.contract import HELDOUT_BUNDLE_DIR
from features.synthetic import GENRES, WorldSpec, make_world, write_world

REPO = Path(__file__).resolve().parents[2]
FAST = ["retrieval.max_epochs=2", "retrieval.min_epochs=1", "ranking.max_epochs=2",
        "ranking.single_task_baselines=false", "ranking.gbdt_max_rounds=30", "training.refit=true"]


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def ratings_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ratings")
    world = make_world(WorldSpec(n_users=150, n_creators=30, n_items=200, days=8, seed=3))
    cfg = write_world(world, root / "data", root / "out", layout="ratings")
    path = root / "ratings.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    sets = [a for s in FAST for a in ("--set", s)]
    r = _cli("training", "fit", "--config", str(path), *sets, "--no-progress", cwd=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return root, cfg


def test_the_fit_models_the_declared_signal_only(ratings_run):
    root, _ = ratings_run
    bundle = root / "out" / "bundle"
    manifest = json.loads((root / "out" / "features" / "manifest.json").read_text())
    spec = manifest["feature_spec"]
    # One derived binary signal, no watch time, no context (no hour unless declared), no duration input.
    assert spec["binary_signals"] == ["like"] and spec["continuous_signals"] == []
    assert spec["context_categorical"] == {}
    genre_cols = [c for c in spec["item_numeric"] if c.startswith("genre=")]
    assert sorted(c.removeprefix("genre=") for c in genre_cols) == sorted(GENRES)
    assert any(c.startswith("keywords=") for c in spec["item_numeric"])
    ranking = json.loads((bundle / "ranking" / "ranking.json").read_text())
    assert [h["name"] for h in ranking["heads"]] == ["like"]
    assert "duration_ms" not in ranking["layout"]["num_columns"]
    assert set(genre_cols) <= set(ranking["layout"]["num_columns"])
    retrieval = json.loads((bundle / "retrieval" / "retrieval.json").read_text())
    assert set(genre_cols) <= set(retrieval["item_tower"]["inputs"][1]["columns"])
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    assert metrics["ranking"]["model"]["like"]["auc"] > 0.5
    assert metrics["retrieval"]["model"]["recall@100"] > 0
    # Multi-hot rows: an item's genre values sum to 1 over the genres it has.
    items = pd.read_parquet(bundle / "features" / "items.parquet")
    sums = items[genre_cols].to_numpy().sum(axis=1)
    np.testing.assert_allclose(sums, 1.0, atol=1e-6)


def test_the_service_serves_it_and_rejects_undeclared_context(ratings_run, serve, tmp_path):
    root, _ = ratings_run
    bundle = root / "out" / "bundle"
    users = pd.read_parquet(bundle / "features" / "users.parquet", columns=["user_id"])["user_id"].astype(str)
    log = pd.read_parquet(bundle / "features" / "interactions.parquet", columns=["user_id", "item_id"])
    user = users.iloc[0]
    seen = set(log.loc[log["user_id"].astype(str) == user, "item_id"].astype(str))
    with serve(bundle, tmp_path / "serve.log") as client:
        r = client.post("/recommend", json={"user_id": user, "k": 10})
        assert r.status_code == 200, r.text
        items = [it["item_id"] for it in r.json()["items"]]
        assert len(items) == 10 and not set(items) & seen
        # Each item is its own creator: at most one per creator on a page is at most one per item.
        assert len(set(items)) == 10
        bad = client.post("/recommend", json={"user_id": user, "k": 10, "context": {"hour": 3}})
        assert bad.status_code in (400, 422) and "context.hour" in bad.text
        notes = client.get("/bundle").json()["data_notes"]
        assert any("no creators" in n for n in notes) and any("no follow signal" in n for n in notes)
    assert "no creators in the data" in (tmp_path / "serve.log").read_text()


def test_evaluate_policy_scores_the_declared_gain(ratings_run, tmp_path):
    root, _ = ratings_run
    # The served bundle is the refit (every day, no held-out period); the held-out fit's bundle sits beside it.
    served = json.loads((root / "out" / "bundle" / "manifest.json").read_text())
    heldout = json.loads((root / "out" / HELDOUT_BUNDLE_DIR / "manifest.json").read_text())
    assert served["refit"] and not heldout["refit"]
    r = _cli("training", "evaluate-policy", "--bundle", str(root / "out" / "bundle"), "--out", str(tmp_path / "x.json"),
             "--no-mlflow", cwd=root)
    assert r.returncode == 2 and HELDOUT_BUNDLE_DIR in r.stderr
    r = _cli("training", "evaluate-policy", "--bundle", str(root / "out" / HELDOUT_BUNDLE_DIR), "--out",
             str(tmp_path / "p.json"), "--k", "10", "--max-users", "40", "--no-mlflow", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "p.json").read_text())
    assert out["gains"] == ["like", "weighted"]
    assert out["policy"]["governance_leaks"] == 0 and out["policy"]["ndcg_dm@10_like"] is not None
    assert "predicted_like" in out["policy"]["calibration_logged_slots"]
    assert any("each item is its own creator" in n for n in out["data"]["notes"])


def test_a_later_log_in_the_same_layout_evaluates(ratings_run, tmp_path):
    root, cfg = ratings_run
    data = Path(cfg["data"]["dir"])
    later = pd.read_csv(data / "ratings.data", sep="\t", header=None).tail(300)
    later[3] = later[3] + 30 * 86_400  # a month after the bundle's data
    path = tmp_path / "later.data"
    later.to_csv(path, sep="\t", header=False, index=False)
    r = _cli("training", "evaluate", "--bundle", str(root / "out" / "bundle"), "--log", str(path),
             "--out", str(tmp_path / "m.json"), cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["data"]["impressions"] == 300 and m["data"]["inside_bundle_data"] == 0
    assert m["ranking"]["model"]["like"]["auc"] is not None


def test_served_page_by_candidate_source_on_the_ratings_layout(ratings_run, tmp_path):
    """The channel evaluation needs nothing KuaiRand-specific: the declared gain, no creators, no upload
    times, on the held-out period (retrieval rebuilt as of its start) and on a later log."""
    root, cfg = ratings_run
    r = _cli("evaluation", "channels", "--bundle", str(root / "out" / HELDOUT_BUNDLE_DIR), "--out",
             str(tmp_path / "c.json"), "--k", "10", "--max-users", "30", "--no-mlflow", "--no-progress", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["gains"] == ["like"] and out["users"] == 30 and out["data"]["as_of"]["rows_before"] > 0
    assert {"served", "ann"} <= set(out["arms"]) and all(0 <= m["ndcg@10_like"] <= 1 for m in out["arms"].values())
    data = Path(cfg["data"]["dir"])
    later = pd.read_csv(data / "ratings.data", sep="\t", header=None).tail(300)
    later[3] = later[3] + 30 * 86_400  # a month after the bundle's data
    path = tmp_path / "later.data"
    later.to_csv(path, sep="\t", header=False, index=False)
    r = _cli("evaluation", "channels", "--bundle", str(root / "out" / "bundle"), "--log", str(path), "--out",
             str(tmp_path / "l.json"), "--k", "10", "--no-mlflow", "--no-progress", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "l.json").read_text())
    assert out["data"]["period"] is None and out["data"]["impressions"] == 300 and "as_of" not in out["data"]
