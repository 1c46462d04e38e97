"""Vocabularies: raw id text -> dense index, 0 reserved for out-of-vocabulary. Deterministic: sorted ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

OOV = 0


class Vocab:
    def __init__(self, name: str, ids: Iterable[str]):
        self.name = name
        self.ids: list[str] = list(ids)
        self._index = pd.Index(self.ids)
        if not self._index.is_unique:
            raise ValueError(f"vocab '{name}' has repeated ids")

    @classmethod
    def build(cls, name: str, values: pd.Series, min_count: int = 1) -> "Vocab":
        counts = values.astype(str).value_counts()
        kept = counts[counts >= min_count].index
        return cls(name, sorted(kept))

    def __len__(self) -> int:
        """Embedding table size, OOV slot included."""
        return len(self.ids) + 1

    def encode(self, values: Iterable[str] | pd.Series | np.ndarray) -> np.ndarray:
        idx = self._index.get_indexer(pd.Index(np.asarray(values, dtype=object).astype(str)))
        return (idx + 1).astype(np.int64)  # -1 (unknown) becomes OOV = 0

    def decode(self, indices: np.ndarray) -> list[str | None]:
        return [self.ids[i - 1] if i > 0 else None for i in np.asarray(indices)]


def save_vocabs(vocabs: dict[str, Vocab], path: Path) -> None:
    path.write_text(json.dumps({name: v.ids for name, v in vocabs.items()}))


def load_vocabs(path: Path) -> dict[str, Vocab]:
    return {name: Vocab(name, ids) for name, ids in json.loads(path.read_text()).items()}
