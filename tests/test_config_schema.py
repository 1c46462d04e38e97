"""The shipped JSON Schema of the config file matches the config dataclasses and agrees with the loader."""

import copy
import importlib.util
import json
from pathlib import Path

import jsonschema_rs
import pytest
import yaml

from features.config import ConfigError, from_dict
from serving.config import settings_from_raw
from training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _generated() -> dict:
    spec = importlib.util.spec_from_file_location("config_schema", REPO / "scripts" / "config_schema.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.config_schema()


@pytest.fixture(scope="module")
def validator():
    return jsonschema_rs.validator_for(json.loads((REPO / "docs" / "config.schema.json").read_text()))


def test_shipped_schema_is_current() -> None:
    shipped = json.loads((REPO / "docs" / "config.schema.json").read_text())
    assert shipped == _generated(), "docs/config.schema.json is stale: run python scripts/config_schema.py --out docs/config.schema.json"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(validator, path: Path) -> None:
    errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert not errors


@pytest.mark.parametrize("edit", [
    lambda c: c["data"].__setitem__("dri", "x"),  # unknown key
    lambda c: c["quality"].__setitem__("prior_strength", "abc"),  # wrong type
    lambda c: c["split"].__setitem__("mode", "weekly"),  # not one of the modes
    lambda c: c.setdefault("serving", {}).__setitem__("candidatez", 5),  # another layer's section
])
def test_schema_and_loader_refuse_the_same_mistakes(validator, edit) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "kuairand.yaml").read_text())
    bad = copy.deepcopy(cfg)
    edit(bad)
    assert not validator.is_valid(bad)
    with pytest.raises(ConfigError):  # each layer's loader checks its own sections
        from_dict(TrainConfig, bad)
        settings_from_raw(bad)
