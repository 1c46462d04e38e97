"""Feature tables -> the towers' named input tensors.

:class:`InputLayout` says exactly which feature-table columns feed which ONNX input and in what order; it
goes into ``retrieval.json`` so serving can build the inputs without torch. Item numeric inputs are raw
values (the item tower normalises them).

Item features are time-correct: a training row's item gets the quality aggregates of the row's snapshot
block (as stored in interactions.parquet); uniform negatives and evaluation candidates get the aggregates of
the same block, recomputed here with the feature layer's own code (:func:`features.quality.snapshot_quality`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from features.config import Config
from features.contract import CatTowerInput, TensorSpec, Tower, TowerInput
from features.quality import snapshot_quality
from features.tables import FeatureTables
from training.stream import history_matrix


@dataclass
class InputLayout:
    user_cat: list[str]  # first one is user_id_idx
    user_cat_sizes: list[int]
    history: str
    history_length: int
    item_cat: list[str]  # item_id_idx, creator_id_idx, category_idx, then attributes
    item_cat_sizes: list[int]
    item_num: list[str]

    @classmethod
    def from_tables(cls, tables: FeatureTables) -> "InputLayout":
        spec = tables.spec
        uc = dict(spec["user_categorical"])
        ic = dict(spec["item_categorical"])
        first = ["item_id", "creator_id", "category"]
        item_names = first + [c for c in ic if c not in first]
        user_names = ["user_id"] + [c for c in uc if c != "user_id"]
        return cls(
            user_cat=[f"{c}_idx" for c in user_names],
            user_cat_sizes=[int(uc[c]) for c in user_names],
            history=spec["history"]["column"],
            history_length=int(spec["history"]["length"]),
            item_cat=[f"{c}_idx" for c in item_names],
            item_cat_sizes=[int(ic[c]) for c in item_names],
            item_num=list(spec["item_numeric"]),
        )

    def user_arrays(self, rows: pd.DataFrame) -> dict[str, np.ndarray]:
        """ONNX feeds of the user tower from rows that carry the user columns and ``history``."""
        history = history_matrix(rows[self.history], self.history_length)
        return {
            "user_cat": rows[self.user_cat].to_numpy(np.int64).reshape(len(rows), len(self.user_cat)),
            "history": history.reshape(len(rows), self.history_length),
        }

    def item_arrays(self, items: pd.DataFrame) -> dict[str, np.ndarray]:
        return {
            "item_cat": items[self.item_cat].to_numpy(np.int64).reshape(len(items), len(self.item_cat)),
            "item_num": items[self.item_num].to_numpy(np.float32).reshape(len(items), len(self.item_num)),
        }

    def towers(self, embedding_dim: int, item_tower_dim: int) -> tuple[Tower, Tower]:
        """The user and item towers as ``retrieval.json`` describes them: inputs in order, and the output."""
        user = Tower(
            (CatTowerInput("user_cat", "int64", ["batch", len(self.user_cat)], self.user_cat,
                           "users.parquet (or a row after FeatureTables.join_static); 0 = unknown",
                           self.user_cat_sizes),
             TowerInput("history", "int64", ["batch", self.history_length], [self.history],
                        "users.parquet 'history': item_id_idx of recent positives, most recent last, left-padded with 0")),
            TensorSpec("user_vec", "float32", ["batch", embedding_dim]),
        )
        item = Tower(
            (CatTowerInput("item_cat", "int64", ["batch", len(self.item_cat)], self.item_cat, "items.parquet",
                           self.item_cat_sizes),
             TowerInput("item_num", "float32", ["batch", len(self.item_num)], self.item_num,
                        "items.parquet; raw values, normalised inside the model")),
            TensorSpec("item_vec", "float32", ["batch", item_tower_dim]),
        )
        return user, item


class ItemFeatures:
    """Item inputs of every catalogue row (items.parquet order) at every snapshot block.

    ``cat`` (N, m) int64 is static; ``num`` (n_blocks, N, n) float32 holds the aggregates as of each block
    start (the last block is the serving snapshot).
    """

    def __init__(self, cfg: Config, tables: FeatureTables, layout: InputLayout, log: pd.DataFrame):
        items = tables.items
        self.item_ids = items["item_id"].astype(str).to_numpy()
        self.index = pd.Index(self.item_ids)
        self.cat = items[layout.item_cat].to_numpy(np.int64)
        n_blocks = len(tables.manifest["split"]["block_starts"])
        binary = cfg.data.binary_signals
        iq = snapshot_quality(log, "item_id", "item", n_blocks, cfg.quality, binary)
        cq = snapshot_quality(log, "creator_id", "creator", n_blocks, cfg.quality, binary)
        num = np.zeros((n_blocks, len(items), len(layout.item_num)), dtype=np.float32)
        for b in range(n_blocks):
            blocks = np.full(len(items), b)
            frame = pd.concat([iq.gather(items["item_id"], blocks), cq.gather(items["creator_id"], blocks)], axis=1)
            for j, c in enumerate(layout.item_num):
                num[b, :, j] = frame[c].to_numpy() if c in frame else items[c].to_numpy(np.float32)
        self.num = num
        # item_id_idx -> creator / category index, for the user tower's history pooling.
        n_items = layout.item_cat_sizes[0]
        known = items["item_id_idx"].to_numpy() > 0
        self.item_creator = np.zeros(n_items, dtype=np.int64)
        self.item_category = np.zeros(n_items, dtype=np.int64)
        self.item_creator[items["item_id_idx"].to_numpy()[known]] = items["creator_id_idx"].to_numpy()[known]
        self.item_category[items["item_id_idx"].to_numpy()[known]] = items["category_idx"].to_numpy()[known]
        self.vocab_rows = np.flatnonzero(known)  # catalogue rows of the items in the id vocabulary

    def rows_of(self, item_ids: pd.Series | np.ndarray) -> np.ndarray:
        pos = self.index.get_indexer(pd.Index(np.asarray(item_ids).astype(str)))
        if (pos < 0).any():
            missing = pd.Series(np.asarray(item_ids)[pos < 0]).unique()[:5].tolist()
            raise ValueError(f"{int((pos < 0).sum())} rows name items missing from items.parquet, e.g. {missing}")
        return pos


@dataclass
class TrainTensors:
    user_cat: torch.Tensor  # (R, k)
    history: torch.Tensor  # (R, L)
    item_row: torch.Tensor  # (R,) catalogue row of the positive
    block: torch.Tensor  # (R,)
    weight: torch.Tensor  # (R,) float32 loss weight of the example

    def __len__(self) -> int:
        return int(self.item_row.shape[0])


def train_tensors(rows: pd.DataFrame, layout: InputLayout, feats: ItemFeatures,
                  weight: np.ndarray | None = None) -> TrainTensors:
    arr = layout.user_arrays(rows)
    w = np.ones(len(rows), np.float32) if weight is None else np.asarray(weight, np.float32)
    return TrainTensors(
        user_cat=torch.from_numpy(arr["user_cat"]),
        history=torch.from_numpy(arr["history"]),
        item_row=torch.from_numpy(feats.rows_of(rows["item_id"]).astype(np.int64)),
        block=torch.from_numpy(rows["block"].to_numpy(np.int64)),
        weight=torch.from_numpy(w),
    )
