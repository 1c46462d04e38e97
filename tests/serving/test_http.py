"""The service over HTTP: one real ``bentoml serve`` (started through ``python -m serving``) on a free
loopback port for the module, plus the same app in process through ``to_asgi()``."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_recommend_over_http(server: httpx.Client, some_user: str):
    r = server.post("/recommend", json={"user_id": some_user, "k": 10, "scenario": "feed", "context": {"tab": 1}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 10 and body["bundle_version"] and body["cold_start"] is False
    item = body["items"][0]
    assert set(item) == {"item_id", "creator_id", "score", "predictions", "reasons", "watch_time_ms"}
    assert "hate" in item["predictions"] and item["reasons"]
    assert all(i["watch_time_ms"] > 0 for i in body["items"])
    cold = server.post("/recommend", json={"user_id": "never-seen-user", "k": 5}).json()
    assert cold["cold_start"] is True and len(cold["items"]) == 5


def test_never_serves_what_the_user_has_seen(server: httpx.Client, serving_bundle: Path):
    import pandas as pd

    log = pd.read_parquet(serving_bundle / "features" / "interactions.parquet", columns=["user_id", "item_id"])
    log = log.astype(str)
    user = log["user_id"].value_counts().index[0]  # the heaviest user: the most to exclude
    shown = set(log.loc[log["user_id"] == user, "item_id"])
    first = server.post("/recommend", json={"user_id": user, "k": 40}).json()["items"]
    served = {i["item_id"] for i in first}
    assert len(first) == 40 and not served & shown
    assert all(any(r.startswith("channel:") for r in i["reasons"]) for i in first)
    # What the client reports as seen is excluded now and remembered: the next plain request avoids it.
    for who in (user, "brand-new-user"):  # cold-start candidates too
        page = server.post("/recommend", json={"user_id": who, "k": 20}).json()["items"]
        reported = [i["item_id"] for i in page]
        again = server.post("/recommend", json={"user_id": who, "k": 20, "seen_item_ids": reported}).json()["items"]
        later = server.post("/recommend", json={"user_id": who, "k": 20}).json()["items"]
        for p in (again, later):
            assert len(p) == 20 and not {i["item_id"] for i in p} & set(reported), who


@pytest.mark.parametrize("body, status, field", [
    ({"user_id": "1", "k": 0}, 400, "k"),
    ({"user_id": "1", "k": 100000}, 400, "k"),
    ({"user_id": "1", "k": "5"}, 400, "k"),
    ({"k": 5}, 400, "user_id"),
    ({"user_id": "1", "colour": "red"}, 400, "colour"),
    ({"user_id": "1", "exclude_item_ids": ["x"] * 1001}, 400, "exclude_item_ids"),
    ({"user_id": "1", "scenario": "nope"}, 422, "scenario"),
])
def test_bad_requests_get_4xx_naming_the_field(server: httpx.Client, body: dict, status: int, field: str):
    r = server.post("/recommend", json=body)
    assert r.status_code == status, r.text
    assert field in r.text


def test_malformed_json_is_a_400(server: httpx.Client):
    r = server.post("/recommend", content=b'{"user_id": "1", "k": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "json" in r.text.lower()


def test_rank_reports_unknown_ids(server: httpx.Client, some_user: str):
    rec = server.post("/recommend", json={"user_id": some_user, "k": 3}).json()
    ids = [i["item_id"] for i in rec["items"]]
    r = server.post("/rank", json={"user_id": some_user, "item_ids": ids + ["no-such-item"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["unknown_item_ids"] == ["no-such-item"] and sorted(i["item_id"] for i in body["items"]) == sorted(ids)
    assert server.post("/rank", json={"user_id": some_user, "item_ids": []}).status_code == 400


def test_health_metrics_and_openapi(server: httpx.Client, some_user: str):
    assert server.get("/livez").status_code == 200 and server.get("/readyz").status_code == 200
    server.post("/recommend", json={"user_id": some_user, "k": 5})
    text = server.get("/metrics").text
    for name in ("feedstack_request_latency_seconds_bucket", "feedstack_candidates_count", "feedstack_bundle_info",
                 "feedstack_creator_exposure_gini", "bentoml_service_request_duration_seconds"):
        assert name in text, name
    info = server.post("/bundle", json={}).json()
    assert f'feedstack_bundle_info{{version="{info["version"]}"}} 1.0' in text
    assert info["ranker_graph"] == "ranking/ranker_request.onnx"  # the served bundle's request graph
    spec = server.get("/docs.json").json()
    assert {"/recommend", "/rank", "/admin/block", "/admin/reload"} <= set(spec["paths"])
    assert server.get("/").status_code == 200


def test_admin_needs_the_token_and_blocks_under_load(server: httpx.Client, some_user: str):
    assert server.post("/admin/block", json={"item_ids": ["x"]}).status_code == 401
    assert server.post("/admin/block", json={"item_ids": ["x"]}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    first = server.post("/recommend", json={"user_id": some_user, "k": 10}).json()["items"]
    item, creator = first[0]["item_id"], first[1]["creator_id"]
    r = server.post("/admin/block", json={"item_ids": [item], "creator_ids": [creator]}, headers=AUTH)
    assert r.status_code == 200 and item in r.json()["blocked_items"]

    def page(_: int) -> list[dict]:
        resp = server.post("/recommend", json={"user_id": some_user, "k": 20})
        assert resp.status_code == 200
        return resp.json()["items"]

    try:
        with ThreadPoolExecutor(4) as ex:
            pages = list(ex.map(page, range(24)))
        for p in pages:
            assert item not in {i["item_id"] for i in p} and creator not in {i["creator_id"] for i in p}
        ranked = server.post("/rank", json={"user_id": some_user, "item_ids": [item]}).json()
        assert ranked["filtered_item_ids"] == [item] and ranked["items"] == []
    finally:
        server.post("/admin/block", json={"item_ids": [item], "creator_ids": [creator], "unblock": True}, headers=AUTH)


def test_reload_refuses_a_corrupt_bundle_and_keeps_serving(server: httpx.Client, serving_bundle: Path,
                                                           tmp_path: Path, some_user: str):
    version = server.post("/bundle", json={}).json()["version"]
    bad = tmp_path / "bad"
    shutil.copytree(serving_bundle, bad)
    (bad / "retrieval" / "retrieval.json").write_text(json.dumps({"tampered": True}))
    r = server.post("/admin/reload", json={"bundle": str(bad)}, headers=AUTH)
    assert r.status_code == 422 and "checksum mismatch for retrieval/retrieval.json" in r.json()["error"]
    ok = server.post("/recommend", json={"user_id": some_user, "k": 5})
    assert ok.status_code == 200 and ok.json()["bundle_version"] == version
    good = server.post("/admin/reload", json={"bundle": str(serving_bundle)}, headers=AUTH)
    assert good.status_code == 200 and good.json()["version"] == version


def test_same_app_in_process_via_to_asgi_starts_unready_and_recovers(serving_bundle: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch, some_user: str):
    """One in-process app per test process (BentoML's metrics middleware registers global collectors)."""
    from starlette.testclient import TestClient

    monkeypatch.setenv("FEEDSTACK_BUNDLE", str(tmp_path / "missing"))
    monkeypatch.setenv("FEEDSTACK_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("FEEDSTACK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FEEDSTACK_BUNDLE_ROOT", str(serving_bundle.parent))
    from serving.service import Feedstack

    with TestClient(Feedstack.to_asgi()) as c:
        assert c.get("/readyz").status_code == 503
        r = c.post("/recommend", json={"user_id": some_user})
        assert r.status_code == 503 and "bundle directory not found: missing" in r.json()["error"]
        assert str(tmp_path) not in r.text
        assert c.post("/admin/reload", json={"bundle": str(serving_bundle)}).status_code == 401
        gc.unfreeze()
        assert c.post("/admin/reload", json={"bundle": str(serving_bundle)}, headers=AUTH).status_code == 200
        assert gc.get_freeze_count() > 0  # the loaded bundle is out of the collector's walk
        gc.unfreeze()
        assert c.get("/readyz").status_code == 200
        r = c.post("/recommend", json={"user_id": some_user, "k": 4})
        assert r.status_code == 200 and len(r.json()["items"]) == 4
        assert c.post("/recommend", json={"user_id": some_user, "k": -1}).status_code == 400


def test_block_reaches_every_worker(serving_bundle: Path, tmp_path: Path, some_user: str, serve):
    """With two worker processes an admin call lands on one of them; the blocklist (one locked file) must
    hold in both, keep every one of 30 concurrent blocks, and survive a restart on the same state dir."""
    state = tmp_path / "state"
    with serve(serving_bundle, tmp_path / "serve.log", workers=2, state_dir=state) as client:
        first = client.post("/recommend", json={"user_id": some_user, "k": 10}).json()["items"]
        item = first[0]["item_id"]
        assert client.post("/admin/block", json={"item_ids": [item]}, headers=AUTH).status_code == 200

        def ranked(_: int) -> dict:
            # A new connection per request, so the kernel spreads them over both workers.
            return httpx.post(f"{client.base_url}/rank", json={"user_id": some_user, "item_ids": [item]}, timeout=30).json()

        with ThreadPoolExecutor(4) as ex:
            answers = list(ex.map(ranked, range(40)))
        assert all(a["filtered_item_ids"] == [item] and a["items"] == [] for a in answers)

        def block(i: int) -> int:
            return httpx.post(f"{client.base_url}/admin/block", json={"creator_ids": [f"fuzz-creator-{i}"]},
                              headers=AUTH, timeout=30).status_code

        with ThreadPoolExecutor(8) as ex:
            assert set(ex.map(block, range(30))) == {200}
        kept = client.post("/admin/block", json={}, headers=AUTH).json()["blocked_creators"]
        assert len([c for c in kept if c.startswith("fuzz-creator-")]) == 30

        # Creator exposure is one state across the workers: every page counts, whichever worker served it.
        def page(_: int) -> None:
            httpx.post(f"{client.base_url}/recommend", json={"user_id": some_user, "k": 5}, timeout=30).raise_for_status()

        before = client.post("/bundle", json={}).json()
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(page, range(30)))
        seen = [httpx.post(f"{client.base_url}/bundle", json={}, timeout=30).json() for _ in range(8)]
        assert before["exposure_shared"] and all(s["exposure_shared"] for s in seen)
        assert {s["exposure_pages"] for s in seen} == {before["exposure_pages"] + 30}
        # a reload could only reach one of them: refused with a reason instead of half-applied
        r = client.post("/admin/reload", json={}, headers=AUTH)
        assert r.status_code == 409 and "one of 2 worker processes" in r.json()["error"]
    with serve(serving_bundle, tmp_path / "restart.log", workers=1, state_dir=state) as client:
        again = client.post("/rank", json={"user_id": some_user, "item_ids": [item]}).json()
        assert again["filtered_item_ids"] == [item]
        kept = client.post("/admin/block", json={}, headers=AUTH).json()["blocked_creators"]
        assert len([c for c in kept if c.startswith("fuzz-creator-")]) == 30


def test_settle_heap_keeps_collections_off_what_is_loaded_and_frees_a_replaced_bundle():
    from serving.service import settle_heap

    class Table:
        pass

    old = Table()
    old.me = old  # a cycle: only the collector frees it, as it would a bundle's
    ref = weakref.ref(old)
    try:
        settle_heap()
        del old
        gc.collect()
        assert ref() is not None  # frozen: a full collection does not walk (nor free) it
        settle_heap()  # the next load unfreezes first: the replaced one goes
        assert ref() is None
    finally:
        gc.unfreeze()


def test_response_body_is_the_json_of_the_result_numpy_scalars_included():
    from serving.results import Result, ScoredItem
    from serving.service import _body

    items = [ScoredItem("i1", "c1", np.float64(1.25), {"click": np.float32(0.5), "hate": 0.015625}, ["relevance"],
                        np.float64(1234.5)),
             ScoredItem("i2", "c2", -0.5, {"click": 0.25, "hate": 0.0}, ["exploration", "channel:ann"], None)]
    r = Result(items, "v1", "feed", np.bool_(False), np.int64(2), unknown_item_ids=["x"])
    body = json.loads(_body(r, unknown_item_ids=r.unknown_item_ids).body)
    assert body == {"items": [
        {"item_id": "i1", "creator_id": "c1", "score": 1.25, "predictions": {"click": 0.5, "hate": 0.015625},
         "reasons": ["relevance"], "watch_time_ms": 1234.5},
        {"item_id": "i2", "creator_id": "c2", "score": -0.5, "predictions": {"click": 0.25, "hate": 0.0},
         "reasons": ["exploration", "channel:ann"], "watch_time_ms": None}],
        "bundle_version": "v1", "scenario": "feed", "cold_start": False, "candidates": 2, "unknown_item_ids": ["x"]}
