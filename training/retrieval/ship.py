"""What the retrieval stage ships to the bundle: both towers exported to ONNX (parity-checked), the
catalogue's vectors, the candidate channels' tables, the FAISS index and ``retrieval.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from features.candidates import build_channel_tables
from features.contract import (CHANNELS, FAISS_INDEX, ITEM_TOWER_ONNX, ITEM_VECTORS, MF_USER_FACTORS,
                               RETRIEVAL_FORMAT_VERSION, USER_TOWER_ONNX, Channels, Covisit, IndexSpec, ItemVectors,
                               MatrixFactors, Prior, RetrievalFiles, RetrievalSpec, Tower)
from features.tables import FeatureTables
from training.onnx_export import OPSET, RandomInputs, check_parity, export_onnx, session
from training.retrieval.config import RetrievalConfig
from training.retrieval.data import InputLayout, ItemFeatures
from training.retrieval.index import build_and_measure
from training.retrieval.model import PriorUserTower, TwoTower
from training.retrieval.served_dims import MFDims, log_prior
from training.retrieval.task import PriorChoice

PARITY_TOL = 1e-4


def random_inputs(layout: InputLayout, num_mean: np.ndarray, num_std: np.ndarray, seed: int):
    """Fresh user-tower and item-tower inputs (item numerics around the train mean and spread)."""
    rnd = RandomInputs(seed)

    def user(b: int) -> dict[str, torch.Tensor]:
        return {"user_cat": rnd.codes(layout.user_cat_sizes, b),
                "history": rnd.history(layout.item_cat_sizes[0], layout.history_length, b)}

    def item(b: int) -> dict[str, torch.Tensor]:
        return {"item_cat": rnd.codes(layout.item_cat_sizes, b), "item_num": rnd.gaussian(num_mean, num_std, b)}

    return user, item


def onnx_vectors(path: Path, feeds: dict[str, np.ndarray], batch: int = 8192) -> np.ndarray:
    sess = session(path, threads=0)
    n = len(next(iter(feeds.values())))
    out = [sess.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


@dataclass
class Shipped:
    """What the stage ships to the bundle: towers (parity-checked), item vectors, channel tables, index."""

    parity: dict[str, float]
    item_vectors: np.ndarray
    item_ids: np.ndarray
    index: Any
    towers: tuple[Tower, Tower]  # user, item
    query_source: str
    mf_dim: int = 0
    mf_weight: float = 0.0


def ship(rc: RetrievalConfig, out_dir: Path, model: TwoTower, prior: PriorChoice, layout: InputLayout, feats: ItemFeatures,
          tables: FeatureTables, rows: pd.DataFrame, num_mean: np.ndarray, num_std: np.ndarray, seed: int,
          window: int, queries: Callable[[], np.ndarray], query_source: str, mf: MFDims | None = None) -> Shipped:
    """Export the towers (the user tower carrying the prior's beta and the MF user factors), the catalogue
    vectors, the channel tables and the index; ``queries()`` (called after the export) gives the
    index-recall query vectors."""
    user_make, item_make = random_inputs(layout, num_mean, num_std, seed)
    user_tower = PriorUserTower(model.user_tower, prior.beta, torch.from_numpy(mf.table) if mf else None).eval()
    if mf is not None:  # also inside the user tower graph; this copy is for eager re-use (bench/naive_path.py)
        np.save(out_dir / MF_USER_FACTORS, mf.table)
    export_onnx(user_tower, user_make(2), out_dir / USER_TOWER_ONNX, ["user_vec"])
    export_onnx(model.item_tower, item_make(2), out_dir / ITEM_TOWER_ONNX, ["item_vec"])
    parity = {
        "user_tower": check_parity(user_tower, out_dir / USER_TOWER_ONNX, user_make).require(
            "user tower", PARITY_TOL).max_abs_diff,
        "item_tower": check_parity(model.item_tower, out_dir / ITEM_TOWER_ONNX, item_make).require(
            "item tower", PARITY_TOL).max_abs_diff,
    }
    # Served vectors: the prior counted over the chosen window at the end of the bundle's data (what serving knows).
    serve_prior = log_prior(rc, rows, feats.item_ids, int(rows["ts"].max()) + 1, prior.days)
    item_vectors = np.hstack([onnx_vectors(out_dir / ITEM_TOWER_ONNX, layout.item_arrays(tables.items)),
                              mf.items if mf else np.zeros((len(tables.items), 0), np.float32),
                              serve_prior.reshape(-1, 1)]).astype(np.float32)
    np.save(out_dir / ITEM_VECTORS, item_vectors)
    build_channel_tables(rows, tables.items, tables.users["user_id"].astype(str).to_numpy(), rc.positive_signal, window,
                 rc.covisit_top, rc.recent_days, int(rows["ts"].max()) + 1).save(out_dir / CHANNELS)
    index = build_and_measure(
        item_vectors, queries(), rc.index_factory, out_dir / FAISS_INDEX, rc.index_recall_k, rc.hnsw_ef_search,
        rc.ivf_nprobe, seed, rc.hnsw_ef_construction,
    )
    mf_dim = mf.items.shape[1] if mf else 0
    return Shipped(parity, item_vectors, feats.item_ids, index,
                    layout.towers(rc.embedding_dim + mf_dim + 1, rc.embedding_dim), query_source, mf_dim,
                    mf.weight if mf else 0.0)


def retrieval_meta(rc: RetrievalConfig, shipped: Shipped, prior: PriorChoice, quotas: dict, window: int, baselines: dict,
          training: dict, metrics: dict) -> dict:
    """``retrieval.json``: what serving needs to run the towers, the index and the channels, and the metrics."""
    index = shipped.index
    user_tower, item_tower = shipped.towers
    spec = RetrievalSpec(
        format_version=RETRIEVAL_FORMAT_VERSION,
        embedding_dim=rc.embedding_dim + shipped.mf_dim + 1,
        opset=OPSET,
        user_tower=user_tower,
        item_tower=item_tower,
        files=RetrievalFiles(USER_TOWER_ONNX, ITEM_TOWER_ONNX, ITEM_VECTORS, FAISS_INDEX, CHANNELS),
        item_vectors=ItemVectors(ITEM_VECTORS, "float32", list(shipped.item_vectors.shape),
                                 "items.parquet rows (row i = items.parquet row i)", "serving snapshot of items.parquet",
                                 shipped.item_ids.tolist()),
        index=IndexSpec(FAISS_INDEX, index.factory, "inner_product", index.ntotal, index.search_params, other={
            "rows": "same as item_vectors", f"recall@{index.k}_vs_exact": index.recall_vs_exact,
            "recall_queries": index.queries, "recall_query_source": shipped.query_source}),
        prior=Prior(prior.beta, rc.embedding_dim + shipped.mf_dim, prior.days, "beta (constant)",
                    "log(1 + training weight of the item's rows)"),
        mf=MatrixFactors(shipped.mf_weight, [rc.embedding_dim, rc.embedding_dim + shipped.mf_dim],
                         "weight x ALS user factors by user_id_idx (0 for unknown users)", "ALS item factors",
                         "every row of the bundle's data", MF_USER_FACTORS if shipped.mf_dim else None),
        channels=Channels(CHANNELS, quotas, list(quotas), Covisit(window, rc.covisit_top, rc.positive_signal),
                          rc.recent_days, "every item shown to each users.parquet user",
                          "items.parquet rows; seen rows = users.parquet rows",
                          chosen_by=f"recall@{rc.channel_total} of the merged candidates on valid"),
        other={
            "similarity": "inner product: L2-normalised tower outputs, then the MF factors (if any), then the "
                          "popularity prior's dimension",
            "temperature": rc.temperature,
            "positive_signal": rc.positive_signal,
            "baselines": baselines,  # chosen on validation; evaluate refits them
            "parity": {"max_abs_diff": shipped.parity, "tolerance": PARITY_TOL},
            "config": asdict(rc),
            "training": training,
            "metrics": {k: metrics[k] for k in ("model", "baselines", "test_users", "channels") if k in metrics},
        },
    )
    return spec.to_json()
