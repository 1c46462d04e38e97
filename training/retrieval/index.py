"""FAISS index from a config factory string, with its recall against exact search measured at build time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np


@dataclass
class IndexReport:
    factory: str
    ntotal: int
    k: int
    queries: int
    recall_vs_exact: float
    search_params: dict[str, int]


def build_index(vectors: np.ndarray, factory: str, ef_search: int = 128, nprobe: int = 16, seed: int = 0,
                ef_construction: int | None = None) -> tuple[faiss.Index, dict[str, int]]:
    """Inner-product index over (N, D) float32 vectors; trains it first when the type needs training.

    ``ef_construction`` (HNSW only) widens the build-time search: a better graph reaches the same recall
    with a smaller efSearch, i.e. faster queries, for a slower build."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    try:
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"retrieval.index_factory = '{factory}' is not a valid FAISS factory string: {e}") from None
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and ivf.nlist > len(x):
            raise ValueError(f"index '{factory}' has {ivf.nlist} IVF lists but only {len(x)} vectors to train on")
        if ivf is not None:
            ivf.cp.seed = seed
        index.train(x)
    hnsw = _hnsw_of(index)
    if hnsw is not None and ef_construction is not None:
        hnsw.efConstruction = ef_construction
    index.add(x)
    return index, set_search_params(index, ef_search, nprobe)


def set_search_params(index: faiss.Index, ef_search: int, nprobe: int) -> dict[str, int]:
    params: dict[str, int] = {}
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.efSearch = ef_search
        params["efSearch"] = ef_search
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
        params["nprobe"] = nprobe
    return params


def _hnsw_of(index: faiss.Index):
    idx = faiss.downcast_index(index)
    if hasattr(idx, "hnsw"):
        return idx.hnsw
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:  # IVF with an HNSW quantizer
        q = faiss.downcast_index(ivf.quantizer)
        if hasattr(q, "hnsw"):
            return q.hnsw
    return None


def recall_vs_exact(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over the queries (exact = brute-force inner product)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, len(x))
    if len(q) == 0 or k == 0:
        return float("nan")
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, gt = exact.search(q, k)
    _, got = index.search(q, k)
    return overlap_recall(got, gt)


def overlap_recall(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |set(got) ∩ set(truth)| / truth width (ignores -1 padding in ``got``)."""
    hits = [len(np.intersect1d(g[g >= 0], t)) for g, t in zip(got, truth)]
    return float(np.mean(hits) / truth.shape[1])


def build_and_measure(
    vectors: np.ndarray, queries: np.ndarray, factory: str, path: Path, k: int = 100,
    ef_search: int = 128, nprobe: int = 16, seed: int = 0, ef_construction: int | None = None,
) -> IndexReport:
    index, params = build_index(vectors, factory, ef_search, nprobe, seed, ef_construction)
    r = recall_vs_exact(index, vectors, queries, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    return IndexReport(factory, int(index.ntotal), min(k, len(vectors)), len(queries), r, params)
