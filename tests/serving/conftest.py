"""Serving fixtures: the bundle to serve is the real one trained on the synthetic world (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


@pytest.fixture(scope="session")
def serving_bundle(synthetic_bundle: Path) -> Path:
    return Path(synthetic_bundle)


REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(bundle: Path, logf: Path, workers: int = 1, state_dir: Path | None = None, bundle_root: Path | None = None):
    """A real ``python -m serving`` on a free loopback port; yields an HTTP client once it is ready."""
    port = _free_port()
    env = {**os.environ, "FEEDSTACK_ADMIN_TOKEN": TOKEN, "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("FEEDSTACK_BUNDLE_ROOT", None)
    cmd = [sys.executable, "-m", "serving", "--bundle", str(bundle), "--port", str(port), "--workers", str(workers),
           "--state-dir", str(state_dir or logf.parent / "state")]
    if bundle_root is not None:
        cmd += ["--bundle-root", str(bundle_root)]
    with run_server(cmd, port, env, logf, REPO) as client:
        yield client


@contextlib.contextmanager
def run_server(cmd: list[str], port: int, env: dict[str, str], logf: Path, cwd: Path):
    """Start ``cmd`` (a server on ``port``), yield an HTTP client once /readyz answers 200, SIGTERM it after."""
    with open(logf, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready:\n{logf.read_text()[-3000:]}")
            time.sleep(0.3)
        yield client
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server") / "serve.log"


@pytest.fixture(scope="session")
def server(serving_bundle: Path, server_log: Path, tmp_path_factory: pytest.TempPathFactory):
    # Reloads may come from anywhere under pytest's base temp dir (the tests' bad bundles live there).
    with _serve(serving_bundle, server_log, bundle_root=tmp_path_factory.getbasetemp()) as client:
        yield client


@pytest.fixture(scope="session")
def some_user(serving_bundle: Path) -> str:
    import pandas as pd

    return str(pd.read_parquet(serving_bundle / "features" / "users.parquet", columns=["user_id"])["user_id"].iloc[0])


@pytest.fixture(scope="session")
def serve():
    """``serve(bundle, log, workers=1, state_dir=None, bundle_root=None)``: a context manager for one more server."""
    return _serve
