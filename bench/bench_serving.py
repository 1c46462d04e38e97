"""Serving latency and throughput over HTTP against the real `bentoml serve`, on loopback.

    .venv/bin/python bench/bench_serving.py --bundle runs/kuairand/bundle            # KuaiRand catalogue
    .venv/bin/python bench/bench_serving.py --bundle runs/kuairand/bundle --synthetic-items 1000000 --naive
    .venv/bin/python bench/bench_serving.py --bundle runs/kuairand/bundle --soak-seconds 600

Phases (each bounded in requests and seconds):
- /recommend k=20 from 500 candidates at concurrency 1 and 8 (>= 2,000 requests each by default):
  p50 / p99 / p99.9 / max client-side latency, req/s, errors, and the server's CPU time per request. Targets on 2 cores: p99 < 10 ms at c=1; >= 250 req/s with
  p99 < 60 ms at c=8.
- --synthetic-items N: the same on an N-item catalogue made from the bundle's items (ids replicated, item
  vectors jittered around the real ones) with an HNSW index (p99 < 12 ms at c=1 for 1M).
- --naive: in process on the same catalogue, the naive path of the issue: PyTorch eager user tower and
  ranker (weights from the run's stage checkpoints, <bundle>/../{retrieval,ranking}/checkpoints), exact
  FAISS search, numpy feature gathers (bench/naive_path.py), against the service's own request path in
  process (no HTTP on either side; target ratio >= 3); the ratio to the HTTP p50 is reported beside it.
- --soak-seconds S: open-loop at half the c=8 rate; errors and server RSS growth.
A one-line JSON summary is printed last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle: Path, env_extra: dict[str, str], log_path: Path, ready_timeout: float = 300):
        import httpx

        self.port = free_port()
        env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **env_extra}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "serving", "--bundle", str(bundle), "--port", str(self.port)],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + ready_timeout
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while True:
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"server not ready; see {log_path}")
                time.sleep(0.5)

    def _tree_sum(self, measure) -> float:
        """``measure(process)`` summed over the server's process tree (the CLI, bentoml serve and its workers)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for p in procs:
            try:
                total += measure(p)
            except psutil.NoSuchProcess:  # a worker that exited while we walked the tree
                continue
        return total

    def rss_mb(self) -> float:
        return self._tree_sum(lambda p: p.memory_info().rss) / 2**20

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the server's process tree."""
        return self._tree_sum(lambda p: sum(p.cpu_times()[:2]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


# --------------------------------------------------------------------------- load


def load(url: str, users: list[str], n: int, concurrency: int, k: int, max_seconds: float,
         rate: float | None = None) -> dict:
    """n requests (or max_seconds) from `concurrency` threads, each with its own keep-alive connection."""
    import httpx

    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(n))
    start = time.perf_counter()
    deadline = start + max_seconds
    interval = concurrency / rate if rate else 0.0

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=10) as c:
            nxt = time.perf_counter()
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                if interval:
                    nxt += interval
                    time.sleep(max(0.0, nxt - time.perf_counter()))
                body = {"user_id": users[int(rng.integers(len(users)))], "k": k}
                t0 = time.perf_counter()
                try:
                    r = c.post("/recommend", json=body)
                    ok = r.status_code == 200 and len(r.json()["items"]) > 0
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    errors[0] += not ok

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    a = np.array(lat) * 1e3
    return {"concurrency": concurrency, "requests": len(a), "errors": errors[0], "seconds": round(wall, 2),
            "rps": round(len(a) / wall, 1) if wall else 0.0,
            "p50_ms": round(float(np.median(a)), 3) if len(a) else None,
            "p99_ms": round(float(np.percentile(a, 99)), 3) if len(a) else None,
            "p999_ms": round(float(np.percentile(a, 99.9)), 3) if len(a) else None,
            "max_ms": round(float(a.max()), 3) if len(a) else None}


def policy_stage_ms(url: str) -> float | None:
    """Mean policy time per /recommend from the service's own stage histogram."""
    import httpx

    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    s = c = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("stage") != "policy":
                continue
            if sample.name == "feedstack_stage_latency_seconds_sum":
                s = sample.value
            elif sample.name == "feedstack_stage_latency_seconds_count":
                c = sample.value
    return round(s / c * 1e3, 3) if s is not None and c else None


# --------------------------------------------------------------------------- synthetic catalogue


def synthetic_bundle(base: Path, n_items: int, factory: str, ef_search: int, cache: Path, seed: int = 0) -> Path:
    """A copy of ``base`` whose catalogue is ``n_items`` items (cached by base manifest + size + factory)."""
    import faiss

    from features.bundle import write_manifest
    from features.contract import MANIFEST, RETRIEVAL, RETRIEVAL_JSON, BundleInfo, Manifest, RetrievalSpec

    key = hashlib.sha256(((base / "manifest.json").read_bytes() + f"{n_items}{factory}{ef_search}{seed}".encode())).hexdigest()[:10]
    out = cache / f"synthetic-{n_items}-{key}"
    if (out / "manifest.json").exists():
        return out
    tmp = cache / f"{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=lambda _d, names: [n for n in names if n in ("interactions.parquet", "single_task")])
    rng = np.random.default_rng(seed)
    items = pd.read_parquet(base / "features" / "items.parquet")
    vecs = np.load(base / "retrieval" / "item_vectors.npy").astype(np.float32)
    src = rng.integers(0, len(items), n_items)
    big = items.iloc[src].reset_index(drop=True)
    big["item_id"] = [f"s{i}" for i in range(n_items)]
    n_creators = max(1, n_items // 20)
    big["creator_id"] = [f"c{j}" for j in rng.integers(0, n_creators, n_items)]
    big["visible"] = rng.random(n_items) > 0.02
    big.to_parquet(tmp / "features" / "items.parquet", index=False)
    x = vecs[src] + rng.normal(0, 0.05, (n_items, vecs.shape[1])).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp / "retrieval" / "item_vectors.npy", x)
    t0 = time.perf_counter()
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    print(f"built {factory} over {n_items} items in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    faiss.write_index(index, str(tmp / "retrieval" / "index.faiss"))
    rpath = tmp / RETRIEVAL / RETRIEVAL_JSON
    spec = RetrievalSpec.from_json(json.loads(rpath.read_text()))
    spec.item_vectors = replace(spec.item_vectors, shape=list(x.shape), item_ids=big["item_id"].tolist())
    # The channel tables cover the base catalogue: the synthetic one serves the ANN alone.
    spec.channels = None
    spec.files.channels = None
    spec.index = replace(spec.index, factory=factory, ntotal=n_items, search_params={"efSearch": ef_search})
    rpath.write_text(json.dumps(spec.to_json()))
    manifest = Manifest.from_json(json.loads((base / MANIFEST).read_text()))
    info = BundleInfo(**{f.name: getattr(manifest, f.name) for f in fields(BundleInfo)})
    write_manifest(tmp, replace(info, index_factory=factory).to_json())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/kuairand/bundle")
    ap.add_argument("--config", default=None, help="YAML with serving: / policy: (default: the bundle's recipe)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--max-seconds", type=float, default=120, help="cap per load phase")
    ap.add_argument("--synthetic-items", type=int, default=0, help="also bench an N-item synthetic catalogue")
    ap.add_argument("--index-factory", default="HNSW32")
    ap.add_argument("--ef-search", type=int, default=128)
    ap.add_argument("--naive", action="store_true", help="naive in-process path on the synthetic catalogue")
    ap.add_argument("--naive-requests", type=int, default=100)
    ap.add_argument("--soak-seconds", type=float, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default="runs/bench")
    args = ap.parse_args()

    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").exists():
        print(f"no bundle at {bundle}: run `python -m training fit` first", file=sys.stderr)
        return 2
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    users = pd.read_parquet(bundle / "features" / "users.parquet", columns=["user_id"])["user_id"].astype(str).tolist()
    # The served policy is the bundle's recipe (or --config), with only the candidate count overridden.
    raw = (yaml.safe_load(Path(args.config).read_text()) if args.config
           else json.loads((bundle / "manifest.json").read_text()).get("config") or {})
    raw = {k: v for k, v in raw.items() if k in ("serving", "policy")}
    raw.setdefault("serving", {})["candidates"] = args.candidates
    cfg = cache / "serving-bench.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {"FEEDSTACK_SERVING_CONFIG": str(cfg.resolve()), "FEEDSTACK_WORKERS": str(args.workers),
           "FEEDSTACK_THREADS": str(args.threads)}
    summary: dict = {"bench": "serving", "bundle": str(bundle), "k": args.k, "candidates": args.candidates,
                     "workers": args.workers, "threads": args.threads}

    def run_phases(b: Path, label: str) -> dict:
        srv = Server(b, env, cache / f"serve-{label}.log")
        try:
            load(srv.url, users, 50, 2, args.k, 30)  # warm up
            res = {}
            for c in args.concurrency:
                # The server's CPU per request: the work a request costs, which the shared machine's
                # scheduling moves far less than wall-clock latency.
                cpu0 = srv.cpu_seconds()
                res[f"c{c}"] = load(srv.url, users, args.requests, c, args.k, args.max_seconds)
                n = res[f"c{c}"]["requests"]
                res[f"c{c}"]["server_cpu_ms_per_request"] = round((srv.cpu_seconds() - cpu0) * 1e3 / n, 3) if n else None
            res["policy_ms_mean"] = policy_stage_ms(srv.url)
            if args.soak_seconds > 0 and label == "catalogue":
                peak = res.get("c8", res[f"c{args.concurrency[-1]}"])["rps"]
                rss0 = srv.rss_mb()
                soak = load(srv.url, users, 10**9, 4, args.k, args.soak_seconds, rate=max(1.0, peak / 2))
                rss1 = srv.rss_mb()
                res["soak"] = {**soak, "rate_target": round(peak / 2, 1), "rss_start_mb": round(rss0, 1),
                               "rss_end_mb": round(rss1, 1), "rss_growth_mb": round(rss1 - rss0, 1)}
            res["rss_mb"] = round(srv.rss_mb(), 1)
            return res
        finally:
            srv.stop()

    summary["catalogue"] = run_phases(bundle, "catalogue")
    c1, c8 = summary["catalogue"].get("c1"), summary["catalogue"].get("c8")
    checks = {}
    if c1:
        checks["c1_p99_lt_10ms"] = c1["p99_ms"] < 10
    if c8:
        checks["c8_rps_ge_250_p99_lt_60ms"] = c8["rps"] >= 250 and c8["p99_ms"] < 60 and c8["errors"] == 0
    if args.synthetic_items:
        big = synthetic_bundle(bundle, args.synthetic_items, args.index_factory, args.ef_search, cache)
        summary["synthetic"] = {"items": args.synthetic_items, "factory": args.index_factory,
                                **run_phases(big, "synthetic")}
        if summary["synthetic"].get("c1"):
            checks["synthetic_c1_p99_lt_12ms"] = summary["synthetic"]["c1"]["p99_ms"] < 12
        if args.naive:
            from naive_path import naive_eager_p50, service_in_process_p50

            naive = naive_eager_p50(big, bundle, bundle.parent, users, args.naive_requests, args.k, args.candidates,
                                    args.max_seconds)
            inproc = service_in_process_p50(big, cfg, users, 500, args.k)
            http = summary["synthetic"]["c1"]["p50_ms"]
            summary["naive"] = {**naive, "service_in_process": inproc,
                                "ratio_p50_in_process": round(naive["p50_ms"] / inproc["p50_ms"], 2),
                                "ratio_p50_vs_http_service": round(naive["p50_ms"] / http, 2)}
            # Like for like: both paths in process, the same requests; the HTTP ratio is reported beside it.
            checks["service_ge_3x_naive_p50"] = summary["naive"]["ratio_p50_in_process"] >= 3
    summary["checks"] = checks
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
