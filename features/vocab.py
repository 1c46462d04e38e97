"""Vocabularies: raw id text -> dense index, 0 reserved for out-of-vocabulary. Deterministic: sorted ids.

A hashed vocabulary (``vocab.hash_buckets``) lists no ids: index = 1 + stable_hash(id) % buckets, so its
table size is set by config, not by the catalogue, and an id never seen still gets a (shared) bucket. The
hash is spelled out (:data:`HASH`) and recorded in ``vocab.json``, so serving, or code in another
language, encodes requests exactly as the feature build did; Python's ``hash()`` is salted per process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

OOV = 0
HASH = "blake2b-64"  # BLAKE2b with an 8-byte digest of the id's UTF-8 text, read as a little-endian uint64


def stable_hash(values: Iterable[str] | pd.Series | np.ndarray) -> np.ndarray:
    """(N,) uint64 :data:`HASH` of each value's text; each distinct value is hashed once."""
    codes, uniques = pd.factorize(np.asarray(values, dtype=object).astype(str))
    digests = np.fromiter((int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little")
                           for u in uniques), dtype=np.uint64, count=len(uniques))
    return digests[codes]


class Vocab:
    def __init__(self, name: str, ids: Iterable[str] = (), hash_buckets: int | None = None):
        self.name = name
        self.hash_buckets = hash_buckets
        self.ids: list[str] = list(ids)
        if hash_buckets is not None and (self.ids or hash_buckets < 1):
            raise ValueError(f"vocab '{name}': a hashed vocabulary takes no ids and at least 1 bucket")
        self._index = pd.Index(self.ids)
        if not self._index.is_unique:
            raise ValueError(f"vocab '{name}' has repeated ids")

    @classmethod
    def build(cls, name: str, values: pd.Series, min_count: int = 1) -> "Vocab":
        return cls.from_counts(name, values.astype(str).value_counts(), min_count)

    @classmethod
    def from_counts(cls, name: str, counts: pd.Series, min_count: int = 1) -> "Vocab":
        """From occurrence counts indexed by id text: the ids seen at least ``min_count`` times, sorted."""
        return cls(name, sorted(counts[counts >= min_count].index))

    def __len__(self) -> int:
        """Embedding table size, OOV slot included."""
        return (self.hash_buckets if self.hash_buckets is not None else len(self.ids)) + 1

    def encode(self, values: Iterable[str] | pd.Series | np.ndarray) -> np.ndarray:
        if self.hash_buckets is not None:
            return (stable_hash(values) % np.uint64(self.hash_buckets) + np.uint64(1)).astype(np.int64)
        idx = self._index.get_indexer(pd.Index(np.asarray(values, dtype=object).astype(str)))
        return (idx + 1).astype(np.int64)  # -1 (unknown) becomes OOV = 0

    def decode(self, indices: np.ndarray) -> list[str | None]:
        if self.hash_buckets is not None:
            raise ValueError(f"vocab '{self.name}' is hashed: an index does not name one id")
        return [self.ids[i - 1] if i > 0 else None for i in np.asarray(indices)]

    def to_json(self) -> list[str] | dict[str, Any]:
        return {"hash": HASH, "buckets": self.hash_buckets} if self.hash_buckets is not None else self.ids

    @classmethod
    def from_json(cls, name: str, raw: list[str] | dict[str, Any]) -> "Vocab":
        if isinstance(raw, dict):
            if raw.get("hash") != HASH:
                raise ValueError(f"vocab '{name}' uses hash {raw.get('hash')!r}; this code knows {HASH!r}")
            return cls(name, hash_buckets=int(raw["buckets"]))
        return cls(name, raw)


class HashedLookup:
    """``dict.get``-shaped access to a hashed vocabulary, for code that encodes one id at a time (serving)."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab

    def get(self, key: str, default: int = OOV) -> int:  # noqa: ARG002 - every id has a bucket
        return int(self.vocab.encode([key])[0])


def request_lookup(name: str, raw: list[str] | dict[str, Any]) -> dict[str, int] | HashedLookup:
    """What serving encodes a request's id with: id -> index for a listed vocabulary, the hash otherwise."""
    if isinstance(raw, dict):
        return HashedLookup(Vocab.from_json(name, raw))
    return {str(v): i + 1 for i, v in enumerate(raw)}


def save_vocabs(vocabs: dict[str, Vocab], path: Path) -> None:
    path.write_text(json.dumps({name: v.to_json() for name, v in vocabs.items()}))


def load_vocabs(path: Path) -> dict[str, Vocab]:
    return {name: Vocab.from_json(name, raw) for name, raw in json.loads(path.read_text()).items()}
