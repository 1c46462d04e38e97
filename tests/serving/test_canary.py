"""Reload is a canary swap: bundles whose checksums verify but whose contents are wrong are refused before
they serve a request, /recommend keeps answering from the old bundle throughout, reload paths stay inside
the bundle root with no absolute paths in any answer, and /readyz fails when the bundle cannot answer."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from features.bundle import bundle_files, sha256_file
from serving.bundle import load_bundle
from serving.canary import Health, probe, public, reload_path
from serving.config import load_settings
from serving.recommender import Recommender
from serving.results import RequestError

AUTH = {"Authorization": "Bearer test-admin-token"}


def _recheck(bundle: Path) -> Path:
    """Rewrite the manifest's checksums, as a careless packaging step would: every file then 'verifies'."""
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"] = {rel: sha256_file(bundle / rel) for rel in bundle_files(bundle)}
    (bundle / "manifest.json").write_text(json.dumps(m))
    return bundle


def _wrong_tower(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    item_tower = next((dst / "retrieval").glob("item_tower*.onnx"), None) or dst / "ranking" / "ranker.onnx"
    shutil.copy(item_tower, dst / "retrieval" / "user_tower.onnx")
    return _recheck(dst)


def _empty_vectors(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    np.save(dst / "retrieval" / "item_vectors.npy", np.zeros((0, 8), np.float32))
    return _recheck(dst)


def _truncated_index(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    idx = dst / "retrieval" / "index.faiss"
    idx.write_bytes(idx.read_bytes()[: idx.stat().st_size // 3])
    return _recheck(dst)


def _wrong_format(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["format_version"] = 999
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


BREAKERS = {"wrong tower": _wrong_tower, "empty vectors": _empty_vectors, "truncated index": _truncated_index,
            "wrong format": _wrong_format}


def test_bad_reloads_are_refused_while_recommend_keeps_answering(server: httpx.Client, serving_bundle: Path,
                                                                  tmp_path: Path, some_user: str):
    version = server.get("/bundle").json()["version"]
    stop, failures, answered = threading.Event(), [], [0]

    def poll() -> None:
        with httpx.Client(base_url=str(server.base_url), timeout=30) as c:
            while not stop.is_set():
                r = c.post("/recommend", json={"user_id": some_user, "k": 5})
                answered[0] += 1
                if r.status_code != 200 or r.json()["bundle_version"] != version:
                    failures.append(r.status_code)

    t = threading.Thread(target=poll)
    t.start()
    try:
        for name, breaker in BREAKERS.items():
            bad = breaker(serving_bundle, tmp_path / name.replace(" ", "-"))
            r = server.post("/admin/reload", json={"bundle": str(bad)}, headers=AUTH)
            assert r.status_code == 422, (name, r.text)
            err = r.json()["error"]
            assert f"still serving {version}" in err and str(tmp_path) not in err and "/tmp/" not in err, err
            assert server.get("/readyz").status_code == 200
    finally:
        stop.set()
        t.join()
    assert answered[0] > 0 and failures == []
    assert server.get("/bundle").json()["version"] == version


def test_reload_paths_stay_under_the_bundle_root(server: httpx.Client):
    answers = [server.post("/admin/reload", json={"bundle": p}, headers=AUTH) for p in ("/etc", "/etc/passwd", "../../..")]
    assert {r.status_code for r in answers} == {422}
    assert len({r.json()["error"] for r in answers}) == 1  # nothing says which paths exist
    assert "bundle root" in answers[0].json()["error"]


def test_reload_path_rules(tmp_path: Path):
    root = tmp_path / "bundles"
    root.mkdir()
    assert reload_path("models:/feedstack@production", root) == "models:/feedstack@production"
    assert reload_path("v2", root) == str(root.resolve() / "v2")
    assert reload_path(str(root / "v2"), root) == str(root.resolve() / "v2")
    (root / "link").symlink_to(tmp_path)
    for bad in ("../x", "/etc", "link/x", "v2\x00"):
        with pytest.raises(RequestError, match="bundle root"):
            reload_path(bad, root)
    with pytest.raises(RequestError, match="FEEDSTACK_BUNDLE_ROOT"):
        reload_path("v2", None)
    msg = public(f"bundle directory not found: {root}/v2; checksum mismatch for retrieval/x.json in /opt/a/b.json", root)
    assert msg == "bundle directory not found: <bundle root>/v2; checksum mismatch for retrieval/x.json in b.json"


def test_readyz_probe_fails_on_a_bundle_that_loads_but_cannot_answer(serving_bundle: Path, tmp_path: Path):
    good = load_bundle(serving_bundle)
    settings = load_settings(None, good.manifest.config)
    probe(Recommender(good, settings))  # a sound bundle answers every probe
    assert Health().ready(Recommender(good, settings))
    bad = load_bundle(_wrong_tower(serving_bundle, tmp_path / "bad"))  # verifies and loads
    rec = Recommender(bad, settings)
    health = Health()
    assert not health.ready(rec) and "probe request failed" in (health.error or "")
