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
    s = load_settings(None, manifest["config"], ["serving.candidates=300", "policy.exploration.slots=0"])
    assert s.serving.candidates == 300
    assert s.policy.exploration.slots == 0 and s.policy.diversity.max_per_creator == 3
    assert manifest["config"]["serving"]["candidates"] == 400  # the recipe itself is not mutated
    with pytest.raises(ConfigError, match="unknown config key 'serving.candidatez'"):
        load_settings(None, manifest["config"], ["serving.candidatez=3"])


def test_cli_rejects_a_bad_override_before_starting(serving_bundle: Path):
    r = subprocess.run([sys.executable, "-m", "serving", "--bundle", str(serving_bundle), "--set", "serving.candidates=lots"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "serving.candidates: expected an integer" in r.stderr


def test_busy_port_is_one_line_and_exit_2(serving_bundle: Path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "serving", "--bundle", str(serving_bundle), "--port", str(port)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


def test_registry_that_training_wrote_is_found_without_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from serving.__main__ import tracking_env

    monkeypatch.chdir(tmp_path)
    env: dict[str, str] = {}
    tracking_env(env, "models:/feedstack@production", None)
    repo_db = REPO / "runs" / "mlflow.db"
    assert env.get("MLFLOW_TRACKING_URI") == (f"sqlite:///{repo_db}" if repo_db.is_file() else None)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mlflow.db").write_bytes(b"")
    tracking_env(env := {}, "models:/feedstack@production", None)
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    for given in ({"MLFLOW_TRACKING_URI": "http://mlflow:5000"},):
        tracking_env(given, "models:/feedstack@production", None)
        assert given["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    tracking_env(env := {}, "models:/feedstack@production", "sqlite:///elsewhere.db")
    tracking_env(path_env := {}, str(tmp_path), None)
    assert env == {} and path_env == {}
