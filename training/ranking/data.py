"""Which feature columns feed the ranker, in which order, and where serving finds each of them.

The ranker takes three named tensors: ``cat`` int64 (B, k) encoded indices (0 = OOV), ``hist`` int64
(B, L) the user's recent item indices (0 = padding), ``num`` float32 (B, n) raw numeric values (NaN
allowed: the model fills the train mean). :class:`FeatureLayout` fixes the columns and is written into
``ranking.json`` so that serving can build the same tensors without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from features.fans import FAN_COLUMNS
from features.tables import FeatureTables
from training.stream import history_matrix

DURATION = "duration_ms"


@dataclass
class FeatureLayout:
    cat_columns: list[str]  # row columns holding encoded indices, e.g. "user_id_idx"
    cat_vocabs: list[str]  # vocabulary of each (its size is the embedding table size)
    cat_sizes: list[int]
    cat_sources: list[str]  # where serving gets it: "request:<vocab>", "users:<col>", "items:<col>"
    num_columns: list[str]
    # "items:<col>", "fans:<col>" (by user_id, creator_id; missing = 0), "users:<col>", and the behaviour
    # tables keyed by pairs (missing = the spec's prior): "user_creator:<col>" (by user_id, creator_id),
    # "item_ctx:<ctx>:<col>" / "creator_ctx:<ctx>:<col>" (by item or creator and the request's context <ctx>)
    num_sources: list[str]
    history_column: str
    history_length: int
    history_vocab: str

    @classmethod
    def from_tables(cls, tables: FeatureTables) -> "FeatureLayout":
        spec = tables.spec
        cat, vocabs, sizes, sources = [], [], [], []
        for c, n in spec["user_categorical"].items():
            cat.append(f"{c}_idx"); vocabs.append(c); sizes.append(int(n))
            sources.append("request:user_id" if c == "user_id" else f"users:{c}_idx")
        for c, n in spec["item_categorical"].items():
            cat.append(f"{c}_idx"); vocabs.append(c); sizes.append(int(n)); sources.append(f"items:{c}_idx")
        for c, n in spec["context_categorical"].items():
            cat.append(f"{c}_idx"); vocabs.append(c); sizes.append(int(n)); sources.append(f"request:{c}")
        num, num_src = [], []
        for c in spec["item_numeric"]:
            num.append(c); num_src.append(f"items:{c}")
        for c in spec.get("user_numeric", []):
            num.append(c); num_src.append(f"users:{c}")
        for c in spec["pair_numeric"]:
            num.append(c); num_src.append(f"fans:{c}")
        for kind, cols in spec.get("behaviour", {}).get("columns", {}).items():
            prefix = {"user": "users", "pair": "user_creator"}.get(kind, kind)
            for c in cols:
                num.append(c); num_src.append(f"{prefix}:{c}")
        if DURATION in tables.items.columns:  # a log whose items have no length gets no duration input
            num.append(DURATION); num_src.append(f"items:{DURATION}")
        h = spec["history"]
        return cls(cat, vocabs, sizes, sources, num, num_src, h["column"], int(h["length"]), h["vocab"])

    @property
    def item_position(self) -> int:
        """Position of the item-id column in ``cat`` (history shares its embedding table)."""
        return self.cat_vocabs.index(self.history_vocab)

    @property
    def duration_position(self) -> int | None:
        return self.num_columns.index(DURATION) if DURATION in self.num_columns else None

    def request_constant(self) -> tuple[list[int], list[int]]:
        """(cat, num) positions that one request shares across its candidates: the user's and the
        context's columns (sources ``request:*`` and ``users:*``)."""
        const = ("request:", "users:")
        return ([i for i, s in enumerate(self.cat_sources) if s.startswith(const)],
                [i for i, s in enumerate(self.num_sources) if s.startswith("users:")])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "FeatureLayout":
        return cls(**d)

    def prepare(self, rows: pd.DataFrame, tables: FeatureTables) -> pd.DataFrame:
        """Rows with every layout column present: static attributes joined, duration from the item table
        where the row lacks it, fan columns defaulting to 0."""
        static = [c for c, src in zip(self.num_columns, self.num_sources) if src.startswith(("items:", "users:"))]
        out = (tables.join_static(rows) if any(c not in rows.columns for c in self.cat_columns + static)
               else rows.copy())
        if DURATION in self.num_columns and (DURATION not in out.columns or out[DURATION].isna().any()):
            pos = tables.positions("items", out["item_id"])
            dur = np.where(pos >= 0, tables.items[DURATION].to_numpy(np.float64)[np.maximum(pos, 0)], np.nan)
            out[DURATION] = out[DURATION].fillna(pd.Series(dur, index=out.index)) if DURATION in out else dur
        for c in FAN_COLUMNS:
            if c in self.num_columns and c not in out.columns:
                out[c] = 0
        still = [c for c in self.cat_columns + self.num_columns + [self.history_column] if c not in out.columns]
        if still:
            raise ValueError(f"ranker inputs need columns the rows lack: {still}")
        return out

    def arrays(self, rows: pd.DataFrame) -> dict[str, np.ndarray]:
        """Named model inputs from prepared rows: cat (N, k) int64, hist (N, L) int64, num (N, n) float32."""
        cat = rows[self.cat_columns].to_numpy(np.int64)
        hist = history_matrix(rows[self.history_column], self.history_length)
        if hist.shape[1] != self.history_length:
            raise ValueError(f"history has length {hist.shape[1]}, the layout expects {self.history_length}")
        num = rows[self.num_columns].to_numpy(np.float32)
        return {"cat": cat, "hist": hist, "num": num}
