"""A fit killed with SIGKILL leaves its MLflow run RUNNING; the next fit in the same output_dir closes it as
KILLED and links the two runs. SIGTERM ends the run as FAILED through the run's own context."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.tracking import RUN_MARKER, mlflow_run

REPO = Path(__file__).resolve().parents[2]
CHILD = """
import sys, time
from pathlib import Path
from training.tracking import mlflow_run
with mlflow_run("fit-all", {"a": 1}, run_dir=Path(sys.argv[1])):
    print("started", flush=True)
    time.sleep(120)
"""


def _start_child(out: Path, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    return proc


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory):
    """One SQLite store for the module (creating its tables is the slow part)."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous_env, previous = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)  # the process-wide URI an earlier test may have set
    yield {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    mlflow.set_tracking_uri(previous)
    if previous_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous_env


def test_killed_fit_run_is_closed_and_linked_by_the_resumed_fit(tmp_path: Path, tracking: dict[str, str]):
    import mlflow

    out = tmp_path / "out"
    proc = _start_child(out, tracking)
    killed_id = (out / RUN_MARKER).read_text().split()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    client = mlflow.MlflowClient()
    assert client.get_run(killed_id).info.status == "RUNNING"  # what kill -9 leaves behind
    with mlflow_run("fit-all", {"a": 1}, run_dir=out, resume=True) as run:
        new_id = run.info.run_id
    old = client.get_run(killed_id)
    assert old.info.status == "KILLED" and old.data.tags["feedstack.continued_by"] == new_id
    new = client.get_run(new_id)
    assert new.info.status == "FINISHED" and new.data.tags["feedstack.resumed_from"] == killed_id
    assert not (out / RUN_MARKER).exists()


def test_a_live_fit_in_the_same_dir_is_left_alone_and_sigterm_fails_the_run(tmp_path: Path, tracking: dict[str, str]):
    import mlflow

    out = tmp_path / "out"
    proc = _start_child(out, tracking)
    live_id = (out / RUN_MARKER).read_text().split()[0]
    try:
        from training.tracking import close_interrupted_run

        assert close_interrupted_run(out) is None
        assert mlflow.MlflowClient().get_run(live_id).info.status == "RUNNING"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    deadline = time.monotonic() + 10
    while mlflow.MlflowClient().get_run(live_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert mlflow.MlflowClient().get_run(live_id).info.status == "FAILED"
