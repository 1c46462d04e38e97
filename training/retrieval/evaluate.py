"""Evaluate a trained bundle's retrieval on a later log with ONNX Runtime only (no torch at evaluation).

"Training" is the bundle's interactions.parquet (all its periods): candidates are the catalogue items that
appear in it, test users are users that appear in it, each user's exclusions are the items it shows that
user; the popularity baselines count the config signal's positives in it (recent: the last
``retrieval.recent_days`` days before its end); MF and co-visitation are refit on it with the
hyper-parameters the fit chose on validation (``retrieval.json`` ``baselines``). User vectors come from the user tower on the serving
snapshot features attached to ``rows`` (users.parquet history); item vectors are the bundle's
``item_vectors.npy`` (row i = items.parquet row i).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from features.contract import RETRIEVAL, RETRIEVAL_JSON
from features.split import DAY_MS
from features.tables import FeatureTables
from training.config import TrainConfig
from training.onnx_export import session
from training.retrieval.baselines import make_scorer
from training.retrieval.metrics import evaluate_all, make_eval_set, popularity_scores


def user_feeds(meta: dict, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """ONNX feeds of the user tower built from the column lists in retrieval.json."""
    return tower_feeds(meta, "user_tower", rows)


def item_feeds(meta: dict, items: pd.DataFrame) -> dict[str, np.ndarray]:
    """ONNX feeds of the item tower (e.g. from items.parquet) built from the column lists in retrieval.json."""
    return tower_feeds(meta, "item_tower", items)


def tower_feeds(meta: dict, tower: str, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    feeds = {}
    for inp in meta[tower]["inputs"]:
        cols = inp["columns"]
        if inp["name"] == "history":
            arr = np.stack(rows[cols[0]].to_numpy()) if len(rows) else np.zeros((0, inp["shape"][1]))
        else:
            arr = rows[cols].to_numpy()
        feeds[inp["name"]] = arr.astype(np.int64 if inp["dtype"] == "int64" else np.float32).reshape(len(rows), -1)
    return feeds


def evaluate_retrieval(bundle_dir: Path, rows: pd.DataFrame, tables: FeatureTables, cfg: TrainConfig) -> dict:
    bundle_dir = Path(bundle_dir)
    rdir = bundle_dir / RETRIEVAL
    meta = json.loads((rdir / RETRIEVAL_JSON).read_text())
    signal = meta["positive_signal"]
    if signal not in rows.columns:
        raise ValueError(f"the later log has no '{signal}' column (the bundle's positive signal)")
    item_vectors = np.load(rdir / meta["files"]["item_vectors"])
    if len(item_vectors) != len(tables.items):
        raise ValueError(f"item_vectors.npy has {len(item_vectors)} rows but items.parquet has {len(tables.items)}")
    seen = pd.read_parquet(
        tables.dir / tables.manifest["tables"]["interactions"]["file"], columns=["user_id", "item_id", "ts", signal]
    )
    catalogue = tables.items["item_id"].astype(str).to_numpy()
    es = make_eval_set(seen, rows, catalogue, signal)
    user_rows = rows.iloc[es.first_row]
    sess = session(rdir / meta["files"]["user_tower"], threads=0)
    feeds = user_feeds(meta, user_rows)
    uv = sess.run(None, feeds)[0] if es.n_users else np.zeros((0, item_vectors.shape[1]), np.float32)
    recent_from = int(seen["ts"].max()) + 1 - int(cfg.retrieval.recent_days * DAY_MS)
    baselines = popularity_scores(seen, catalogue, es, signal, recent_from)
    # MF and co-visitation with the hyper-parameters the fit chose on validation, refit on the bundle's data.
    for name, params in (meta.get("baselines") or {}).items():
        baselines[name] = make_scorer(name, params, cfg.retrieval.baselines, seen, catalogue, es, signal, cfg.seed)
    metrics, _ = evaluate_all(es, uv, item_vectors[es.candidates], baselines,
                              list(cfg.retrieval.eval_ks), list(cfg.retrieval.ndcg_ks))
    return metrics
