"""The naive serving path the issue compares against: PyTorch eager models and exact FAISS search.

Same work per request as the service (user tower -> top-N candidates -> ranker over N -> fused score ->
top k of the visible items), in process, with inputs gathered by plain numpy indexing (no pandas in the
loop), so the ratio measures what ONNX Runtime and HNSW buy rather than a slow feature join. Weights come
from the stage checkpoints of the run that produced the bundle (``<output_dir>/retrieval`` and
``<output_dir>/ranking``). Imported by bench_serving.py; needs the training extra (torch).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd


def load_eager(base_bundle: Path, run_dir: Path):
    """(user tower, ranker scorer, ranking layout, ranking meta) in eval mode, from the run's checkpoints."""
    from features.config import from_dict
    from features.tables import FeatureTables
    from training.checkpoints import load_eager_ranker, model_state
    from training.config import TrainConfig
    from training.retrieval.data import InputLayout, ItemFeatures
    from training.retrieval.model import PriorUserTower
    from training.retrieval.pipeline import build_model, load_interactions
    import torch

    manifest = json.loads((base_bundle / "manifest.json").read_text())
    cfg = from_dict(TrainConfig, manifest["config"])
    tables = FeatureTables.load(base_bundle / "features")
    layout = InputLayout.from_tables(tables)
    feats = ItemFeatures(cfg, tables, layout, load_interactions(tables))
    n = len(layout.item_num)
    two_tower = build_model(layout, feats, cfg.retrieval, np.zeros(n, np.float32), np.ones(n, np.float32))
    two_tower.load_state_dict(model_state(run_dir / "retrieval" / "checkpoints" / "best.ckpt"))
    meta = json.loads((base_bundle / "ranking" / "ranking.json").read_text())
    scorer, rlayout, _ = load_eager_ranker(meta, run_dir / "ranking" / "checkpoints" / "best.ckpt")
    rmeta = json.loads((base_bundle / "retrieval" / "retrieval.json").read_text())
    prior, mf_file = rmeta.get("prior"), (rmeta.get("mf") or {}).get("user_factors_file")
    mf = torch.from_numpy(np.load(base_bundle / "retrieval" / mf_file)) if mf_file else None
    user_tower = (two_tower.user_tower if prior is None
                  else PriorUserTower(two_tower.user_tower, prior["beta"], mf))
    return user_tower.eval(), scorer, rlayout, meta, layout


def naive_eager_p50(big_bundle: Path, base_bundle: Path, run_dir: Path, users: list[str], n: int, k: int,
                    candidates: int, max_seconds: float, scenario: str = "feed") -> dict:
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    user_tower, scorer, rl, meta, ul = load_eager(base_bundle, run_dir)
    items = pd.read_parquet(big_bundle / "features" / "items.parquet")
    udf = pd.read_parquet(big_bundle / "features" / "users.parquet")
    urow = pd.Index(udf["user_id"].astype(str))
    x = np.load(big_bundle / "retrieval" / "item_vectors.npy")
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    user_cat = np.ascontiguousarray(udf[ul.user_cat].to_numpy(np.int64))
    history = np.ascontiguousarray(np.stack(udf["history"].to_numpy()).astype(np.int64))
    # Ranker inputs: item columns as one matrix each, user columns per user, request/fans columns defaulted.
    cat_item = [(j, s.split(":", 1)[1]) for j, s in enumerate(rl.cat_sources) if s.startswith("items:")]
    cat_user = [(j, s.split(":", 1)[1]) for j, s in enumerate(rl.cat_sources) if s.startswith("users:")]
    num_item = [(j, s.split(":", 1)[1]) for j, s in enumerate(rl.num_sources) if s.startswith("items:")]
    item_cat_m = items[[c for _, c in cat_item]].to_numpy(np.int64)
    item_num_m = items[[c for _, c in num_item]].to_numpy(np.float32)
    user_cat_m = udf[[c for _, c in cat_user]].to_numpy(np.int64)
    uid_pos = rl.cat_sources.index("request:user_id")
    heads = [h["name"] for h in meta["heads"]]
    w = torch.tensor([meta["scenarios"][scenario].get(h, 0.0) for h in heads], dtype=torch.float32)
    visible = items["visible"].to_numpy(bool)
    item_ids = items["item_id"].to_numpy(dtype=object)  # once: an Arrow-backed column converts slowly
    rng = np.random.default_rng(1)
    lat, search = [], []
    deadline = time.monotonic() + max_seconds
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        r = int(urow.get_loc(users[int(rng.integers(len(users)))]))
        t0 = time.perf_counter()
        with torch.inference_mode():
            uv = user_tower(torch.from_numpy(user_cat[r : r + 1]), torch.from_numpy(history[r : r + 1])).numpy()
        ts = time.perf_counter()
        _, ids = exact.search(uv, candidates)
        search.append(time.perf_counter() - ts)
        cand = ids[0][ids[0] >= 0]
        m = len(cand)
        cat = np.zeros((m, len(rl.cat_sources)), np.int64)
        cat[:, [j for j, _ in cat_item]] = item_cat_m[cand]
        cat[:, [j for j, _ in cat_user]] = user_cat_m[r]
        cat[:, uid_pos] = user_cat[r, 0]
        num = np.zeros((m, len(rl.num_sources)), np.float32)
        num[:, [j for j, _ in num_item]] = item_num_m[cand]
        hist = np.repeat(history[r : r + 1], m, axis=0)
        with torch.inference_mode():
            scores = scorer(torch.from_numpy(cat), torch.from_numpy(hist), torch.from_numpy(num))[0]
            fused = (scores @ w).numpy()
        fused[~visible[cand]] = -np.inf
        top = cand[np.argsort(-fused, kind="stable")[:k]]
        _ = item_ids[top].tolist()
        lat.append(time.perf_counter() - t0)
    a = np.array(lat) * 1e3
    return {"path": "torch eager user tower + exact FAISS + torch eager ranker, numpy gathers",
            "requests": len(a), "p50_ms": round(float(np.median(a)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "exact_search_p50_ms": round(float(np.median(search)) * 1e3, 3)}


def service_in_process_p50(bundle: Path, config: Path, users: list[str], n: int, k: int) -> dict:
    """The service's own request path (Recommender.recommend: ONNX, HNSW, policy) in process, no HTTP:
    the like-for-like counterpart of the naive path."""
    from serving.bundle import load_bundle
    from serving.config import load_settings
    from serving.recommender import Recommender

    b = load_bundle(bundle)
    rec = Recommender(b, load_settings(str(config), b.manifest.config))
    rng = np.random.default_rng(1)
    lat = []
    for i in range(n + 50):
        u = users[int(rng.integers(len(users)))]
        t0 = time.perf_counter()
        rec.recommend(u, k)
        if i >= 50:  # warm-up
            lat.append(time.perf_counter() - t0)
    a = np.array(lat) * 1e3
    return {"requests": len(a), "p50_ms": round(float(np.median(a)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}
