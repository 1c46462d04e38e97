"""The ranker's behaviour inputs keyed by pairs, looked up per request from the bundle's snapshot tables
(features/behaviour.py): ``user_creator:<col>`` by (user, candidate's creator), ``item_ctx:<ctx>:<col>`` and
``creator_ctx:<ctx>:<col>`` by (candidate's item or creator, the request's context value). A pair absent
from its table gets the prior the feature spec records, exactly as ``FeatureTables.attach_snapshot`` does
for a later log. (User-level behaviour columns are ordinary ``users:<col>`` sources.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.bundle import BundleError

KINDS = ("user_creator", "item_ctx", "creator_ctx")


@dataclass
class SortedTable:
    """Rows sorted by an int64 key; ``lookup`` returns (n, c) values, the prior where a key is absent."""

    keys: np.ndarray  # (F,) int64 ascending
    values: np.ndarray  # (F, c) float32
    prior: np.ndarray  # (c,) float32

    @classmethod
    def build(cls, keys: np.ndarray, values: np.ndarray, prior: np.ndarray) -> "SortedTable":
        ok = keys >= 0
        order = np.argsort(keys[ok], kind="stable")
        return cls(keys[ok][order].astype(np.int64), values[ok][order].astype(np.float32), prior.astype(np.float32))

    def with_values(self, keys: np.ndarray, values: np.ndarray) -> "SortedTable":
        """This table with ``values`` for ``keys`` (unique; replaced where present, added where not)."""
        ok = keys >= 0
        keep = ~np.isin(self.keys, keys[ok])
        return SortedTable.build(np.concatenate([self.keys[keep], keys[ok]]),
                                 np.concatenate([self.values[keep], values[ok].astype(np.float32)]), self.prior)

    def lookup(self, query: np.ndarray) -> np.ndarray:
        out = np.broadcast_to(self.prior, (len(query), len(self.prior))).copy()
        if len(self.keys):
            pos = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
            hit = self.keys[pos] == query
            out[hit] = self.values[pos[hit]]
        return out


@dataclass
class ContextSource:
    ctx: str
    by_creator: bool  # key = candidate's creator code (else its item row)
    positions: np.ndarray  # positions in the ranker's num input
    per_value: dict[str, SortedTable]  # context value (as str) -> table
    prior: np.ndarray
    columns: list[str]  # the table's value columns, in ``positions`` order


@dataclass
class BehaviourLookup:
    pair_positions: np.ndarray
    pairs: SortedTable | None  # key = user row * n_creators + creator code
    n_creators: int
    contexts: list[ContextSource]
    pair_columns: list[str]

    @classmethod
    def load(cls, fdir: Path, spec: dict[str, Any], num_sources: list[str], user_ids: np.ndarray,
             creator_ids: np.ndarray, item_ids: np.ndarray) -> "BehaviourLookup":
        groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for pos, src in enumerate(num_sources):
            kind, _, rest = src.partition(":")
            if kind == "user_creator":
                groups.setdefault((kind, ""), []).append((pos, rest))
            elif kind in ("item_ctx", "creator_ctx"):
                ctx, _, col = rest.partition(":")
                groups.setdefault((kind, ctx), []).append((pos, col))
        if groups and not spec:
            raise BundleError(f"ranking.json reads behaviour sources {sorted(groups)}, the feature spec has none")
        user_code = pd.Index(user_ids)
        creator_code = pd.Index(creator_ids)
        n_c = len(creator_ids)
        pairs, pair_pos, pair_cols, contexts = None, np.zeros(0, np.int64), [], []
        for (kind, ctx), cols in groups.items():
            names = [c for _, c in cols]
            table = "user_creator" if kind == "user_creator" else f"{kind.removesuffix('_ctx')}_{ctx}"
            df = _read(fdir, table, names)
            prior = np.array([float(spec["priors"][c]) for c in names], np.float32)
            vals = df[names].to_numpy(np.float32)
            if kind == "user_creator":
                u = user_code.get_indexer(df["user_id"].astype(str))
                c = creator_code.get_indexer(df["creator_id"].astype(str))
                key = np.where((u >= 0) & (c >= 0), u.astype(np.int64) * n_c + c, -1)
                pairs, pair_pos = SortedTable.build(key, vals, prior), np.array([p for p, _ in cols], np.int64)
                pair_cols = names
                continue
            by_creator = kind == "creator_ctx"
            ent = (creator_code if by_creator else pd.Index(item_ids)).get_indexer(
                df["creator_id" if by_creator else "item_id"].astype(str))
            ctx_vals = df[ctx].astype(str).to_numpy()
            per = {v: SortedTable.build(ent[ctx_vals == v], vals[ctx_vals == v], prior) for v in np.unique(ctx_vals)}
            contexts.append(ContextSource(ctx, by_creator, np.array([p for p, _ in cols], np.int64), per, prior,
                                          names))
        return cls(pair_pos, pairs, n_c, contexts, pair_cols)

    def as_of(self, rows: pd.DataFrame, user_ids: np.ndarray, creator_ids: np.ndarray,
              item_ids: np.ndarray) -> "BehaviourLookup":
        """This lookup as of a period's start, for offline evaluation: ``rows`` are the impressions from that
        start on, in time order, each carrying its block's time-correct values. A key's first row there
        holds its values as of the start (it had no row in between), so those replace the snapshot's, which
        counts every row up to the end of the data; a key without such a row had none since the start,
        and its snapshot values are already those of the start."""
        def first(keys: np.ndarray, cols: list[str], where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            k = keys[where]
            _, at = np.unique(k, return_index=True)  # the first occurrence of each key (rows in time order)
            return k[at], rows[cols].to_numpy(np.float32)[where][at]

        every = np.ones(len(rows), bool)
        pairs = self.pairs
        if pairs is not None and all(c in rows for c in self.pair_columns + ["user_id", "creator_id"]):
            u = pd.Index(user_ids).get_indexer(rows["user_id"].astype(str))
            c = pd.Index(creator_ids).get_indexer(rows["creator_id"].astype(str))
            key = np.where((u >= 0) & (c >= 0), u.astype(np.int64) * self.n_creators + c, -1)
            pairs = pairs.with_values(*first(key, self.pair_columns, every))
        contexts = []
        for src in self.contexts:
            by = "creator_id" if src.by_creator else "item_id"
            if not all(c in rows for c in src.columns + [src.ctx, by]):
                contexts.append(src)
                continue
            ent = pd.Index(creator_ids if src.by_creator else item_ids).get_indexer(rows[by].astype(str))
            values = rows[src.ctx].astype(str).to_numpy()
            per = dict(src.per_value)
            for v in np.unique(values):
                table = per.get(v) or SortedTable.build(np.zeros(0, np.int64), np.zeros((0, len(src.columns))), src.prior)
                per[v] = table.with_values(*first(ent.astype(np.int64), src.columns, values == v))
            contexts.append(dataclasses.replace(src, per_value=per))
        return dataclasses.replace(self, pairs=pairs, contexts=contexts)

    def fill(self, num: np.ndarray, user_row: int, rows: np.ndarray, item_creator: np.ndarray,
             context: dict[str, Any] | None) -> None:
        """Write the behaviour columns of candidates ``rows`` (catalogue rows) into ``num`` (n, n_num)."""
        if self.pairs is not None and len(self.pair_positions):
            if user_row >= 0:
                num[:, self.pair_positions] = self.pairs.lookup(user_row * self.n_creators + item_creator[rows])
            else:
                num[:, self.pair_positions] = self.pairs.prior
        ctx = context or {}
        for src in self.contexts:
            value = ctx.get(src.ctx)
            table = src.per_value.get(str(value)) if value is not None else None
            if table is None:
                num[:, src.positions] = src.prior
            else:
                num[:, src.positions] = table.lookup(item_creator[rows] if src.by_creator else rows)


def _read(fdir: Path, table: str, columns: list[str]) -> pd.DataFrame:
    path = fdir / f"{table}.parquet"
    if not path.is_file():
        raise BundleError(f"the ranker reads behaviour table features/{table}.parquet, which is missing")
    df = pd.read_parquet(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise BundleError(f"features/{table}.parquet lacks columns the ranker reads: {missing}")
    return df
