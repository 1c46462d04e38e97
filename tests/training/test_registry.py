"""Real MLflow (SQLite store in a temp dir): a version is registered per bundle; the alias moves only on gates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from features.bundle import verify_bundle
from features.config import load_config
from training.bundle import assemble_bundle, check_gates, log_and_register
from training.config import TrainConfig


def test_check_gates_reads_dotted_paths():
    metrics = {"retrieval": {"model": {"recall@100": 0.2}}, "ranking": {"model": {"click": {"auc": 0.55}}}}
    g = check_gates(metrics, {"retrieval.model.recall@100": 0.1, "ranking.model.click.auc": 0.6, "nope.x": 0.0})
    assert [g[k]["passed"] for k in g] == [True, False, False]
    assert g["nope.x"]["value"] is None


def test_alias_moves_only_when_gates_pass(synthetic_config, synthetic_tables, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # default artifact root ./mlruns lands in the temp dir
    cfg = load_config(synthetic_config, [f"output_dir={tmp_path / 'run'}"], TrainConfig)
    shutil.copytree(synthetic_tables.dir, Path(cfg.output_dir) / "features")
    cfg.tracking.gates = {"retrieval.model.recall@100": 0.5}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()

    def register(recall: float):
        metrics = {"retrieval": {"model": {"recall@100": recall}}}
        bundle = assemble_bundle(cfg, metrics)
        with mlflow.start_run():
            return log_and_register(cfg, bundle, metrics)

    good = register(0.6)
    assert good.alias_moved and str(client.get_model_version_by_alias("feedstack", "production").version) == good.version
    bad = register(0.1)
    assert not bad.alias_moved and bad.version != good.version
    assert str(client.get_model_version_by_alias("feedstack", "production").version) == good.version
    assert client.get_model_version("feedstack", bad.version).tags["gates"] == "failed"
    # the registered alias resolves to a loadable, verified bundle
    local = mlflow.artifacts.download_artifacts("models:/feedstack@production", dst_path=str(tmp_path / "dl"))
    m = verify_bundle(local, require=("features",))
    assert m["metrics"]["retrieval"]["model"]["recall@100"] == pytest.approx(0.6)
