"""Reliability benchmarks against the real `python -m serving` (issue 13's bar), one phase per flag:

    .venv/bin/python bench/bench_reliability.py --bundle runs/kuairand/bundle --fuzz-examples 400
    .venv/bin/python bench/bench_reliability.py --bundle runs/kuairand/bundle --blocks-runs 10
    .venv/bin/python bench/bench_reliability.py --bundle runs/kuairand/bundle --bad-reloads
    .venv/bin/python bench/bench_reliability.py --bundle runs/kuairand/bundle --soak-seconds 600

- --fuzz-examples N: schemathesis, all checks, fixed seed, N examples per operation, admin token given;
  cases generated, server errors and whether it found no issue (its own summary).
- --blocks-runs R: R times, 30 concurrent /admin/block calls on a 2-worker service; blocks kept, and kept
  after a restart on the same state dir.
- --bad-reloads: reloads of a wrong tower, empty item vectors, a truncated index and a wrong format while
  /recommend is polled; refused reloads and failed polls.
- --soak-seconds S: good /recommend traffic mixed with the bad-input corpus (below) for S seconds at 4
  connections; 5xx count and server RSS growth (after a warm-up minute's worth of the same mix).
A one-line JSON summary is printed last.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_serving import Server  # noqa: E402

TOKEN = "bench-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


def bad_corpus(user: str) -> list[tuple[str, str, dict[str, str], bytes]]:
    """(method, path, headers, body): every malformed request of the issue, plus a few more."""
    j = lambda o: json.dumps(o).encode()  # noqa: E731
    cases = [
        ("POST", "/recommend", {"Content-Type": "multipart/form-data"}, j({"user_id": "0"})),
        ("POST", "/rank", {"Content-Type": "multipart/form-data"}, j({"user_id": "0", "item_ids": ["1"]})),
        ("POST", "/recommend", {"Content-Type": "text/plain"}, j({"user_id": user})),
        ("POST", "/recommend", {}, j({"user_id": user})),
        ("POST", "/recommend", {"Content-Type": "application/x-www-form-urlencoded"}, b"user_id=1"),
        ("POST", "/recommend", JSON, j({"user_id": user, "context": {"tab": "x"}})),
        ("POST", "/recommend", JSON, j({"user_id": user, "context": {"tab": 999}})),
        ("POST", "/recommend", JSON, j({"user_id": user, "context": {"colour": 1}})),
        ("POST", "/recommend", JSON, b'{"user_id": "1", "context": {"tab": NaN}}'),
        ("POST", "/recommend", JSON, b'{"user_id": "1", "context": {"tab": 1e308}}'),
        ("POST", "/recommend", JSON, b'{"user_id": "1", "user_id": "2"}'),
        ("POST", "/recommend", JSON, b'{"user_id": "1", "k": '),
        ("POST", "/recommend", JSON, b"[" * 50_000),
        ("POST", "/recommend", JSON, j({"user_id": "1", "k": 0})),
        ("POST", "/recommend", JSON, j({"user_id": "1", "scenario": "nope"})),
        ("POST", "/recommend", JSON, b"x" * (2 << 20)),
        ("POST", "/admin/reload", JSON, j({"bundle": "/etc/passwd"})),
        ("POST", "/admin/reload", {**JSON, **AUTH}, j({"bundle": "/etc/passwd"})),
        ("POST", "/admin/block", JSON, j({"item_ids": "x"})),
        ("GET", "/recommend", {}, b""),
        ("DELETE", "/bundle", {}, b""),
    ]
    return cases


def unknown_path() -> tuple[str, str, dict[str, str], bytes]:
    return ("GET", f"/{uuid.uuid4().hex}/{uuid.uuid4().hex}", {}, b"")


def some_users(bundle: Path, n: int = 200) -> list[str]:
    users = pd.read_parquet(bundle / "features" / "users.parquet", columns=["user_id"])["user_id"].astype(str)
    return users.iloc[:n].tolist()


# --------------------------------------------------------------------------- phases


def fuzz(bundle: Path, work: Path, examples: int, seed: int = 13) -> dict:
    srv = Server(bundle, {"FEEDSTACK_ADMIN_TOKEN": TOKEN, "FEEDSTACK_STATE_DIR": str(work / "fuzz-state")},
                 work / "fuzz-serve.log")
    try:
        cmd = [str(Path(sys.executable).with_name("schemathesis")), "--config-file",
               str(REPO / "tests" / "serving" / "schemathesis.toml"), "run", f"{srv.url}/docs.json", "--checks", "all",
               "--max-examples", str(examples), "--seed", str(seed), "--header", f"Authorization: Bearer {TOKEN}",
               "--workers", "1", "--no-color", "--generation-database", "none",
               "--request-timeout", "30", "--phases", "examples,coverage,fuzzing"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        out = r.stdout
        (work / "fuzz-output.txt").write_text(out + r.stderr)
        cases = re.search(r"(\d+) generated", out)
        return {"exit_code": r.returncode, "cases": int(cases.group(1)) if cases else None,
                "server_errors": out.count("Server error"), "no_issues": "No issues found" in out,
                "seconds": round(time.perf_counter() - t0, 1),
                "summary": [ln.strip() for ln in out.strip().splitlines()[-8:] if ln.strip()]}
    finally:
        srv.stop()


def blocks(bundle: Path, work: Path, runs: int) -> dict:
    import httpx

    kept, survived = [], []
    for run in range(runs):
        state = work / f"blocks-state-{run}"
        env = {"FEEDSTACK_ADMIN_TOKEN": TOKEN, "FEEDSTACK_STATE_DIR": str(state), "FEEDSTACK_WORKERS": "2"}
        srv = Server(bundle, env, work / f"blocks-{run}.log")
        try:
            def block(i: int) -> int:
                return httpx.post(f"{srv.url}/admin/block", json={"creator_ids": [f"bench-{run}-{i}"]}, headers=AUTH,
                                  timeout=30).status_code

            with ThreadPoolExecutor(30) as ex:
                codes = list(ex.map(block, range(30)))
            got = httpx.post(f"{srv.url}/admin/block", json={}, headers=AUTH, timeout=30).json()["blocked_creators"]
            kept.append(sum(c.startswith(f"bench-{run}-") for c in got) if set(codes) == {200} else -1)
        finally:
            srv.stop()
        srv = Server(bundle, {**env, "FEEDSTACK_WORKERS": "1"}, work / f"blocks-{run}-restart.log")
        try:
            got = httpx.post(f"{srv.url}/admin/block", json={}, headers=AUTH, timeout=30).json()["blocked_creators"]
            survived.append(sum(c.startswith(f"bench-{run}-") for c in got))
        finally:
            srv.stop()
    return {"runs": runs, "kept_of_30": kept, "after_restart": survived,
            "all_kept": all(k == 30 for k in kept) and all(s == 30 for s in survived)}


def bad_reloads(bundle: Path, work: Path) -> dict:
    import httpx

    sys.path.insert(0, str(REPO / "tests" / "serving"))
    from test_canary import BREAKERS  # the same broken bundles the tests build

    root = work / "bundles"
    root.mkdir(exist_ok=True)
    env = {"FEEDSTACK_ADMIN_TOKEN": TOKEN, "FEEDSTACK_STATE_DIR": str(work / "reload-state"),
           "FEEDSTACK_BUNDLE_ROOT": str(root)}
    good = root / "good"
    if not good.exists():
        shutil.copytree(bundle, good)
    users = some_users(bundle)
    srv = Server(good, env, work / "reload-serve.log")
    stop, polls, failed = threading.Event(), [0], [0]

    def poll(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/recommend", json={"user_id": users[int(rng.integers(len(users)))], "k": 10})
                polls[0] += 1
                failed[0] += r.status_code != 200

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(2)]
    outcomes = {}
    try:
        for t in threads:
            t.start()
        for name, breaker in BREAKERS.items():
            dst = root / name.replace(" ", "-")
            shutil.rmtree(dst, ignore_errors=True)
            breaker(bundle, dst)
            r = httpx.post(f"{srv.url}/admin/reload", json={"bundle": dst.name}, headers=AUTH, timeout=120)
            outcomes[name] = {"status": r.status_code, "error": r.json().get("error", "")[:160]}
        r = httpx.post(f"{srv.url}/admin/reload", json={"bundle": "good"}, headers=AUTH, timeout=120)
        outcomes["good"] = {"status": r.status_code}
    finally:
        stop.set()
        for t in threads:
            t.join()
        srv.stop()
    return {"reloads": outcomes, "polls": polls[0], "failed_polls": failed[0]}


def soak(bundle: Path, work: Path, seconds: float) -> dict:
    import httpx

    users = some_users(bundle)
    env = {"FEEDSTACK_ADMIN_TOKEN": TOKEN, "FEEDSTACK_STATE_DIR": str(work / "soak-state")}
    srv = Server(bundle, env, work / "soak-serve.log")
    corpus = bad_corpus(users[0])
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def drive(seed: int, until: float) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            while time.monotonic() < until:
                x = rng.random()
                if x < 0.5:
                    r = c.post("/recommend", json={"user_id": users[int(rng.integers(len(users)))], "k": 20})
                else:
                    method, path, headers, body = (unknown_path() if x < 0.6 else corpus[int(rng.integers(len(corpus)))])
                    r = c.request(method, path, headers=headers, content=body)
                with lock:
                    key = f"{r.status_code // 100}xx"
                    counts[key] = counts.get(key, 0) + 1

    try:
        warm = min(60.0, seconds / 5)
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda s: drive(s, time.monotonic() + warm), range(4)))
        rss0, log0 = srv.rss_mb(), len((work / "soak-serve.log").read_text().splitlines())
        metrics0 = len(httpx.get(f"{srv.url}/metrics").content)
        counts.clear()
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda s: drive(s, t0 + seconds), range(10, 14)))
        rss1 = srv.rss_mb()
        metrics1 = len(httpx.get(f"{srv.url}/metrics").content)
        lines = (work / "soak-serve.log").read_text().splitlines()[log0:]
    finally:
        srv.stop()
    total = sum(counts.values())
    return {"seconds": seconds, "requests": total, "by_class": counts, "server_errors": counts.get("5xx", 0),
            "rss_start_mb": round(rss0, 1), "rss_end_mb": round(rss1, 1), "rss_growth": round(rss1 / rss0 - 1, 4),
            "metrics_bytes": [metrics0, metrics1], "log_lines": len(lines),
            "tracebacks_in_log": sum("Traceback" in ln for ln in lines)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--fuzz-examples", type=int, default=0)
    ap.add_argument("--blocks-runs", type=int, default=0)
    ap.add_argument("--bad-reloads", action="store_true")
    ap.add_argument("--soak-seconds", type=float, default=0)
    args = ap.parse_args()
    bundle = Path(args.bundle).resolve()
    work = Path(args.work or tempfile.mkdtemp(prefix="feedstack-reliability-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"bundle": str(bundle)}
    if args.fuzz_examples:
        res["fuzz"] = fuzz(bundle, work, args.fuzz_examples)
        print(json.dumps(res["fuzz"]), flush=True)
    if args.blocks_runs:
        res["blocks"] = blocks(bundle, work, args.blocks_runs)
        print(json.dumps(res["blocks"]), flush=True)
    if args.bad_reloads:
        res["bad_reloads"] = bad_reloads(bundle, work)
        print(json.dumps(res["bad_reloads"]), flush=True)
    if args.soak_seconds:
        res["soak"] = soak(bundle, work, args.soak_seconds)
        print(json.dumps(res["soak"]), flush=True)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
