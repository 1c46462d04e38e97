"""Shared fixtures: one small synthetic world (with ground truth) and its built feature tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from features.build import build_features
from features.config import load_config
from features.synthetic import World, WorldSpec, make_world, write_world
from features.tables import FeatureTables

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def world() -> World:
    return make_world(WorldSpec(seed=7))


@pytest.fixture(scope="session")
def synthetic_config(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a YAML config of the synthetic world; its output_dir is a fresh temp dir."""
    root = tmp_path_factory.mktemp("synthetic")
    cfg = write_world(world, root / "data", root / "out")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def synthetic_tables(synthetic_config: Path) -> FeatureTables:
    cfg = load_config(synthetic_config)
    res = build_features(cfg, progress=False)
    return FeatureTables.load(res.out_dir)


def write_config(world: World, root: Path, layout: str = "kuairand", **sections) -> Path:
    """Write ``world`` under ``root`` and a config for it (sections deep-merged over the defaults)."""
    cfg = write_world(world, root / "data", root / "out", layout=layout)  # type: ignore[arg-type]
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def synthetic_bundle(synthetic_config: Path, synthetic_tables: FeatureTables, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle: both models trained for a couple of epochs on the synthetic world by the training
    code, exported to ONNX, indexed with FAISS and assembled; MLflow logs go to a temp SQLite store."""
    import os
    import shutil

    import mlflow

    from training.bundle import assemble_bundle
    from training.config import TrainConfig
    from training.ranking.pipeline import fit_ranking
    from training.retrieval.pipeline import fit_retrieval

    root = tmp_path_factory.mktemp("bundle_run")
    cfg = load_config(
        synthetic_config,
        [f"output_dir={root}", "retrieval.max_epochs=2", "ranking.max_epochs=2", "ranking.single_task_baselines=false",
         "ranking.gbdt_baseline=false", "retrieval.mf_weights=[1.0]"],  # MF dimensions: the MF channel serves
        TrainConfig,
    )
    shutil.copytree(synthetic_tables.dir, root / "features")
    tables = FeatureTables.load(root / "features")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    try:
        exp = mlflow.create_experiment("synthetic", artifact_location=(root / "mlartifacts").as_uri())
        with mlflow.start_run(run_name="synthetic-bundle", experiment_id=exp):
            metrics = {
                "retrieval": fit_retrieval(cfg, tables, root / "retrieval", progress=False),
                "ranking": fit_ranking(cfg, tables, root / "ranking", progress=False),
            }
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return assemble_bundle(cfg, metrics)
