"""A bundle as of the start of one of its own periods, for offline evaluation: the period view of
:func:`serving.offline_cases.period_view` (histories, item aggregates, fan relations) plus what retrieval
knows rebuilt from the rows before the period with the training code that built it: channel tables and
seen sets, the MF factors (refitted with the bundle's chosen ALS settings), the popularity prior, and an
exact index over the resulting vectors. The towers are the held-out fit's own (trained before the
validation period). Served as shipped, the seen sets would hide the period's own items and the MF factors
and prior would know its outcomes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from features.config import from_dict
from serving.bundle import Bundle


class _AsOfUserTower:
    """The bundle's user-tower session with the MF user factors of its output replaced by ``factors``
    (refitted on earlier rows); the tower and the prior's weight are the graph's own."""

    def __init__(self, session: Any, user_input: str, factors: np.ndarray, dims: tuple[int, int]):
        self.session, self.user_input, self.factors, self.dims = session, user_input, factors, dims

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = np.array(self.session.run(outputs, feeds)[0], dtype=np.float32)
        idx = np.asarray(feeds[self.user_input])[:, 0]
        ok = (idx >= 0) & (idx < len(self.factors))
        out[:, self.dims[0]:self.dims[1]] = np.where(ok[:, None], self.factors[np.where(ok, idx, 0)], 0.0)
        return [out]


def as_of(bundle: Bundle, view: Bundle, start: int) -> tuple[Bundle, dict[str, Any]]:
    """``view`` with channel tables, seen sets, MF factors, prior and index rebuilt from the rows before
    ``start`` (ms)."""
    import faiss

    from features.candidates import build_channel_tables
    from features.contract import RETRIEVAL
    from features.tables import FeatureTables
    from training.config import TrainConfig
    from training.retrieval.log import load_log
    from training.retrieval.served_dims import log_prior, mf_fit

    cfg = from_dict(TrainConfig, bundle.manifest.config)
    rc = cfg.retrieval
    tables = FeatureTables.load(bundle.path / "features")
    rows = load_log(cfg, tables)
    before = rows[rows["ts"].to_numpy() < start]
    spec = bundle.retrieval
    note: dict[str, Any] = {"rows_before": int(len(before)), "as_of_ms": int(start)}
    changes: dict[str, Any] = {}
    if spec.channels is not None:
        cov = spec.channels.covisit
        changes["channels"] = build_channel_tables(before, tables.items, tables.users["user_id"].astype(str).to_numpy(),
                                                   cov.signal, cov.window, cov.top, spec.channels.trending_days, start)
        note["channels"] = "rebuilt"
    vectors = np.array(np.load(bundle.path / RETRIEVAL / spec.files.item_vectors), dtype=np.float32)
    item_ids = tables.items["item_id"].astype(str).to_numpy()
    if spec.prior is not None and spec.prior.dimension < vectors.shape[1]:
        vectors[:, spec.prior.dimension] = log_prior(rc, before, item_ids, start, spec.prior.days)
        note["prior"] = "rebuilt"
    mf = spec.mf
    if mf is not None and mf.weight > 0 and mf.dimensions[1] > mf.dimensions[0]:
        params = spec.other["baselines"]["mf"]
        vocab = int(tables.users["user_id_idx"].max()) + 1
        seed = cfg.seed if rc.seed is None else rc.seed
        fit = mf_fit(rc, before, item_ids, tables, vocab, params, mf.weight, seed)
        lo, hi = (int(d) for d in mf.dimensions)
        vectors[:, lo:hi] = fit.items
        user_input = spec.user_tower.inputs[0].name  # user_cat: column 0 is the user id the factors are keyed by
        changes.update(user_tower=_AsOfUserTower(view.user_tower, user_input, fit.table, (lo, hi)),
                       mf_items=np.ascontiguousarray(vectors[:, lo:hi]))
        note["mf"] = f"refitted: {params}"
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    note["index"] = "exact inner product over the rebuilt vectors"
    return dataclasses.replace(view, index=index, item_vectors=vectors, **changes), note
