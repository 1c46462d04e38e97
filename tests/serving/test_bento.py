"""BentoML's own packaging: `bentoml build` makes a Bento of the service from bentofile.yaml (serving code and
the features layer, no training code, no torch), and `bentoml serve` of that Bento serves a real bundle."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.serving.conftest import _free_port, run_server

REPO = Path(__file__).resolve().parents[2]


def _pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    home = tmp_path_factory.mktemp("bentoml_home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", "bentofile.yaml", "--output", "tag"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tag = r.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return home / "bentos" / name / version, env


def test_the_bento_holds_the_service_and_no_training_code(bento):
    path, _ = bento
    src = path / "src"
    assert (src / "serving" / "service.py").exists() and (src / "features" / "contract.py").exists()
    assert not (src / "training").exists() and not (src / "tests").exists()
    spec = yaml.safe_load((path / "bento.yaml").read_text())
    assert spec["service"] == "serving.service:Feedstack" and spec["entry_service"] == "feedstack"
    packages = (path / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert not any(p.lower().startswith(("torch", "lightning")) for p in packages)
    # Every pinned package is at the version constraints.txt resolves for the rest of the stack.
    constraints = _pins((REPO / "constraints.txt").read_text().splitlines())
    pinned = _pins(packages)
    assert pinned and {k: v for k, v in pinned.items() if constraints.get(k) != v} == {}


def test_bentoml_serve_of_the_bento_serves_a_bundle(bento, serving_bundle, tmp_path):
    import pandas as pd

    path, env = bento
    port = _free_port()
    env = {**env, "FEEDSTACK_BUNDLE": str(serving_bundle), "FEEDSTACK_STATE_DIR": str(tmp_path / "state")}
    tag = f"{path.parent.name}:{path.name}"
    cmd = [sys.executable, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1", "--port", str(port)]
    with run_server(cmd, port, env, tmp_path / "serve.log", tmp_path) as client:
        user = str(pd.read_parquet(serving_bundle / "features" / "users.parquet", columns=["user_id"])["user_id"].iloc[0])
        r = client.post("/recommend", json={"user_id": user, "k": 5})
        assert r.status_code == 200 and len(r.json()["items"]) == 5, r.text
        assert "serving bundle" in (tmp_path / "serve.log").read_text()
