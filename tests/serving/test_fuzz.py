"""Schemathesis against the real service (its own ``python -m serving``): every check, a fixed seed and a
bounded number of examples per operation, on the document the service itself serves at /docs.json.
The same run with >= 2,000 cases is ``bench/bench_reliability.py --fuzz-examples``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOKEN = "test-admin-token"  # the one serve() starts with

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_finds_no_failure(serve, serving_bundle: Path, tmp_path: Path):
    with serve(serving_bundle, tmp_path / "serve.log") as client:
        cli = str(Path(sys.executable).with_name("schemathesis"))
        cmd = [cli, "--config-file", str(CONFIG), "run", f"{client.base_url}/docs.json", "--checks", "all",
               "--max-examples", "10", "--seed", "7", "--workers", "1", "--no-color", "--no-shrink",
               "--phases", "coverage,fuzzing", "--header", f"Authorization: Bearer {TOKEN}",
               "--request-timeout", "30", "--generation-database", "none"]
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "passed" in out and "Server error" not in out
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
