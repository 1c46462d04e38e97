"""Every malformed request gets a clean 4xx over HTTP (real ``bentoml serve``): content types, ids as numbers,
strict JSON, context checked against the bundle, the admin token before the body, unknown paths kept out
of the metrics, one log line per client error, and an OpenAPI document that matches the answers."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from serving.guard import BadRequest, parse_json

AUTH = {"Authorization": "Bearer test-admin-token"}


@pytest.mark.parametrize("content_type", ["multipart/form-data", "text/plain", "application/x-www-form-urlencoded", None])
def test_non_json_bodies_get_415(server: httpx.Client, content_type: str | None):
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/recommend", "/rank"):
        r = server.post(path, content=b'{"user_id": "0"}', headers=headers)
        assert r.status_code == 415, (path, r.text)
        assert "application/json" in r.json()["error"]


def test_ids_may_be_integers_or_strings(server: httpx.Client, some_user: str):
    as_text = server.post("/recommend", json={"user_id": some_user, "k": 5, "context": {"tab": 1}})
    as_int = server.post("/recommend", json={"user_id": int(some_user), "k": 5, "context": {"tab": 1}})
    assert as_text.status_code == as_int.status_code == 200, as_int.text
    assert as_int.json()["cold_start"] is False
    ids = [i["item_id"] for i in as_text.json()["items"]]
    ranked = server.post("/rank", json={"user_id": int(some_user), "item_ids": [int(i) for i in ids]})
    assert ranked.status_code == 200 and sorted(i["item_id"] for i in ranked.json()["items"]) == sorted(ids)
    whole = server.post("/recommend", json={"user_id": float(some_user), "k": 5.0, "context": {"tab": 1.0}})
    assert whole.status_code == 200 and whole.json()["cold_start"] is False  # JSON Schema integers include 5.0
    for bad in ({"user_id": True}, {"user_id": -1}, {"user_id": 1.5}, {"user_id": "1", "k": 2.5}):
        r = server.post("/recommend", json=bad)
        assert r.status_code == 400 and r.json()["field"] in bad, (bad, r.text)


@pytest.mark.parametrize("raw, status, field", [
    (b'{"user_id": "1", "context": {"tab": "x"}}', 422, "context.tab"),
    (b'{"user_id": "1", "context": {"tab": 999}}', 422, "context.tab"),
    (b'{"user_id": "1", "context": {"colour": 1}}', 422, "context.colour"),
    (b'{"user_id": "1", "context": {"hour": 24}}', 422, "context.hour"),
    (b'{"user_id": "1", "context": {"tab": 1e308}}', 400, "context.tab"),
    (b'{"user_id": "1", "context": {"tab": NaN}}', 400, None),
    (b'{"user_id": "1", "k": 1e999}', 400, None),
    (b'{"user_id": "1", "user_id": "2"}', 400, "user_id"),
    (b'["user_id"]', 400, None),
    (b'', 400, None),
])
def test_bad_bodies_are_4xx_naming_the_field(server: httpx.Client, raw: bytes, status: int, field: str | None):
    r = server.post("/recommend", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["error"], str) and body.get("field") == field
    if field:
        assert field in body["error"]


def test_known_context_values_are_accepted(server: httpx.Client, some_user: str):
    r = server.post("/recommend", json={"user_id": some_user, "k": 3, "context": {"tab": "1", "hour": 23}})
    assert r.status_code == 200, r.text


def test_strict_json_parser():
    assert parse_json(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for raw in (b'{"a": 1, "a": 2}', b'{"a": Infinity}', b'{"a": 1e400}', b'{"a": ' + b"9" * 5000 + b"}", b"[" * 100000):
        with pytest.raises(BadRequest):
            parse_json(raw)


def test_admin_token_is_checked_before_the_body(server: httpx.Client):
    for body in (b'{"bundle": 5}', b"not json", b'{"item_ids": "x"}'):
        for path in ("/admin/reload", "/admin/block"):
            r = server.post(path, content=body, headers={"Content-Type": "text/plain"})
            assert r.status_code == 401, (path, body, r.text)
    r = server.post("/admin/block", content=b'{"item_ids": "x"}', headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "item_ids"


def _series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_unknown_paths_do_not_grow_the_metrics(server: httpx.Client):
    def round_of(n: int) -> list[str]:
        paths = [f"/{uuid.uuid4().hex}/{uuid.uuid4().hex}" for _ in range(n)]
        codes = {server.get(p).status_code for p in paths} | {server.post(p, json={}).status_code for p in paths[:20]}
        assert codes == {404}
        return paths

    round_of(20)  # series that appear once (the not_found counter) appear here
    before = server.get("/metrics").text
    paths = round_of(150)
    after = server.get("/metrics").text
    assert not any(p in after for p in paths)
    new = _series(after) - _series(before)
    assert new == set(), sorted(new)[:20]  # counters move; no series per path
    assert 'feedstack_requests_total{endpoint="unknown",outcome="not_found"}' in after


def test_each_client_error_is_one_log_line(server: httpx.Client, server_log: Path):
    marker = uuid.uuid4().hex
    n0 = len(server_log.read_text().splitlines())
    for i in range(20):
        server.post("/recommend", json={"user_id": "1", "k": 0, "scenario": f"{marker}"})
        server.get(f"/{marker}/{i}")
        server.post("/recommend", json={"user_id": "1", "scenario": marker})  # 422 from the handler
    lines = server_log.read_text().splitlines()[n0:]
    assert len(lines) == 60, lines[:10]
    assert not any("Traceback" in ln or "ERROR" in ln for ln in lines)


def test_get_bundle_and_the_spec_matches_the_answers(server: httpx.Client):
    got = server.get("/bundle")
    assert got.status_code == 200 and got.json()["loaded"] and got.json()["version"]
    assert not got.json()["path"].startswith("/")
    spec = server.get("/docs.json").json()
    recommend = spec["paths"]["/recommend"]["post"]
    assert {"200", "400", "415", "422", "503"} <= set(recommend["responses"])
    assert spec["components"]["schemas"]["Error"]["properties"]["error"]["type"] == "string"
    body = recommend["requestBody"]["content"]["application/json"]["schema"]
    scenarios = body["properties"]["scenario"]["anyOf"][0]["enum"]
    assert scenarios == sorted(got.json()["scenarios"])
    assert "tab" in body["properties"]["context"]["anyOf"][0]["properties"]
    assert "get" in spec["paths"]["/bundle"] and spec["paths"]["/admin/reload"]["post"]["security"]
    for method, path, allow in (("DELETE", "/bundle", "GET, POST"), ("GET", "/recommend", "POST")):
        r = server.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow
    bad = server.post("/recommend", json={"user_id": "1", "k": 0})
    assert set(bad.json()) <= set(spec["components"]["schemas"]["Error"]["properties"])
    assert json.dumps(spec)  # serialisable as served
