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
