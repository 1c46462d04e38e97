"""Feature tables as one object: load a features directory (or a bundle's copy of it) and attach features
to interaction rows.

- :meth:`FeatureTables.join_static` adds static attributes (item category and attributes, user
  attributes) by id: used for training rows and for any later log alike.
- :meth:`FeatureTables.attach_snapshot` encodes a later log with the *serving snapshot* (quality
  aggregates, fan relations and user history as known at the end of the training data): what serving
  sees for a request, and what ``evaluate --log`` uses on held-out days.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.behaviour import attach_serving
from features.contract import MANIFEST, VOCAB
from features.fans import FAN_COLUMNS
from features.vocab import Vocab, load_vocabs


@dataclass
class FeatureTables:
    dir: Path
    manifest: dict[str, Any]
    items: pd.DataFrame
    users: pd.DataFrame
    creators: pd.DataFrame
    fans: pd.DataFrame
    vocabs: dict[str, Vocab]
    behaviour: dict[str, pd.DataFrame] = field(default_factory=dict)  # pair-keyed snapshot tables by name
    _indexes: dict[str, tuple[pd.DataFrame, pd.Index]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, directory: str | Path) -> "FeatureTables":
        d = Path(directory)
        if not (d / MANIFEST).exists():
            raise FileNotFoundError(f"{d} holds no feature manifest ({MANIFEST}); run `python -m features build`")
        manifest = json.loads((d / MANIFEST).read_text())
        read = lambda name: pd.read_parquet(d / manifest["tables"][name]["file"])  # noqa: E731
        extra = manifest["feature_spec"].get("behaviour", {}).get("tables", {})
        return cls(d, manifest, read("items"), read("users"), read("creators"), read("fans"), load_vocabs(d / VOCAB),
                   {name: read(name) for name in extra})

    def positions(self, table: str, ids: pd.Series) -> np.ndarray:
        """Row of each id in ``items`` or ``users`` (-1 = unknown). The id index is built once per table:
        building it (and its uniqueness check) cost more than the lookup itself for a 64k-row chunk."""
        frame = getattr(self, table)
        cached = self._indexes.get(table)
        if cached is None or cached[0] is not frame:
            cached = self._indexes[table] = (frame, pd.Index(frame[{"items": "item_id", "users": "user_id"}[table]]))
        return cached[1].get_indexer(ids.astype(str))

    @property
    def spec(self) -> dict[str, Any]:
        return self.manifest["feature_spec"]

    @property
    def user_attributes(self) -> list[str]:
        return [c for c in self.spec["user_categorical"] if c != "user_id"]

    @property
    def item_attributes(self) -> list[str]:
        return [c for c in self.spec["item_categorical"] if c not in ("item_id", "creator_id")]

    @property
    def context_columns(self) -> list[str]:
        return list(self.spec["context_categorical"])

    def join_static(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Add ``<attr>_idx`` for item attributes (by item_id) and user attributes (by user_id), unknown -> 0,
        and the static numeric inputs the rows lack (item numerics such as multi-hot attributes, user
        numerics), unknown -> NaN (the models fill the train mean)."""
        out = rows.copy()
        pos, upos = self.positions("items", out["item_id"]), self.positions("users", out["user_id"])
        for table, where, cols, missing in (
            (self.items, pos, [f"{c}_idx" for c in self.item_attributes], 0),
            (self.users, upos, [f"{c}_idx" for c in self.user_attributes], 0),
            (self.items, pos, [c for c in self.spec["item_numeric"] if c not in out.columns], np.nan),
            (self.users, upos, [c for c in self.spec.get("user_numeric", []) if c not in out.columns], np.nan),
        ):
            for c in cols:
                vals = table[c].to_numpy()[np.maximum(where, 0)]
                out[c] = np.where(where >= 0, vals, missing)
        return out

    def attach_snapshot(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Encode ids and context with the vocabularies and add the serving-snapshot features."""
        out = rows.copy()
        for c in ("user_id", "item_id", "creator_id"):
            out[f"{c}_idx"] = self.vocabs[c].encode(out[c].astype(str))
        for c in self.context_columns:
            out[f"{c}_idx"] = self.vocabs[c].encode(out[c].astype(str)) if c in out else 0
        numeric = list(self.spec["item_numeric"])
        pos = self.positions("items", out["item_id"])
        for c in numeric:
            vals = self.items[c].to_numpy()[np.maximum(pos, 0)]
            out[c] = np.where(pos >= 0, vals, np.nan).astype(np.float32)
        fans = out[["user_id", "creator_id"]].merge(self.fans, on=["user_id", "creator_id"], how="left")
        for c in FAN_COLUMNS:
            out[c] = fans[c].fillna(0).to_numpy().astype(np.int32 if c == "fan_interactions" else np.int8)
        upos = self.positions("users", out["user_id"])
        length = self.spec["history"]["length"]
        hist = np.zeros((len(out), length), dtype=np.int64)
        known = upos >= 0
        if known.any():
            hist[known] = np.stack(self.users["history"].to_numpy()[upos[known]])
        out["history"] = list(hist)
        if "behaviour" in self.spec:
            beh = attach_serving(out, self.spec["behaviour"], self.users, self.behaviour)
            out = pd.concat([out.drop(columns=[c for c in beh.columns if c in out.columns]), beh], axis=1)
        return self.join_static(out)
