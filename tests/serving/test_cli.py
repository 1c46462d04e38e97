"""`python -m serving` takes --config / --set like every feedstack CLI and refuses bad values up front."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from features.config import ConfigError
from serving.config import load_settings

REPO = Path(__file__).resolve().parents[2]


def test_set_overrides_apply_on_top_of_the_bundle_recipe():
    manifest = {"config": {"serving": {"candidates": 400}, "policy": {"diversity": {"max_per_creator": 3}}}}
    s = load_settings(None, manifest, ["serving.candidates=300", "policy.exploration.slots=0"])
    assert s.serving.candidates == 300
    assert s.policy.exploration.slots == 0 and s.policy.diversity.max_per_creator == 3
    assert manifest["config"]["serving"]["candidates"] == 400  # the recipe itself is not mutated
    with pytest.raises(ConfigError, match="unknown config key 'serving.candidatez'"):
        load_settings(None, manifest, ["serving.candidatez=3"])


def test_cli_rejects_a_bad_override_before_starting(serving_bundle: Path):
    r = subprocess.run([sys.executable, "-m", "serving", "--bundle", str(serving_bundle), "--set", "serving.candidates=lots"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "serving.candidates: expected an integer" in r.stderr
