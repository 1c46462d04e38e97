"""User-side behaviour aggregates, time-correct like the item and creator quality aggregates.

For rows of snapshot block b only rows of earlier blocks count (:class:`features.quality.BlockCounter`);
the serving tables hold the snapshot at the end of the data. Groups (every binary signal of the config,
or ``behaviour.signals``):

- per user: ``user_n`` (log1p impressions), smoothed ``user_rate_<signal>``, ``user_watch_ratio`` and
  ``user_activity`` (impressions per day of data before the block);
- per (user, creator): ``uc_n`` and ``uc_<signal>``, raw counts (0 for pairs never seen);
- per (item, context) and (creator, context), for every context column of the log (e.g. ``tab``):
  ``item_<ctx>_n`` / ``item_<ctx>_rate_<signal>`` / ``item_<ctx>_watch_ratio`` and the same for creators.
  A pair never seen gets the block's prior (n = 0, the global rate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from features.config import Config, QualityConfig
from features.quality import BlockCounter, Snapshots, snapshot_quality

DAY_MS = 86_400_000
SEP = "\x1f"  # joins the parts of a composite key; never inside an id read from CSV


def pair_key(a: pd.Series | np.ndarray, b: pd.Series | np.ndarray) -> pd.Series:
    return pd.Series(np.asarray(a, dtype=object)).astype(str) + SEP + pd.Series(np.asarray(b, dtype=object)).astype(str)


def context_columns(cfg: Config) -> list[str]:
    return [c for c in cfg.data.interactions.columns if c not in ("user_id", "item_id", "ts")]


def behaviour_signals(cfg: Config) -> list[str]:
    return list(cfg.behaviour.signals) or list(cfg.data.binary_signals)


def snapshot_pair_counts(log: pd.DataFrame, key: pd.Series, prefix: str, n_blocks: int,
                         signals: list[str]) -> Snapshots:
    """Raw counts per composite key and block: ``<prefix>_n`` impressions, ``<prefix>_<signal>`` positives."""
    counter = BlockCounter(key, log["block"].to_numpy(np.int64), n_blocks)
    values = {f"{prefix}_n": counter.before()}
    values |= {f"{prefix}_{s}": counter.before(log[s].to_numpy(np.float64)) for s in signals}
    prior = {name: np.zeros(n_blocks, np.float32) for name in values}
    return Snapshots(pd.Index(counter.keys), {k: v.astype(np.float32) for k, v in values.items()}, prior)


def snapshot_user(log: pd.DataFrame, block_starts: list[int], qcfg: QualityConfig, signals: list[str]) -> Snapshots:
    n_blocks = len(block_starts)
    snap = snapshot_quality(log, "user_id", "user", n_blocks, QualityConfig(prior_strength=qcfg.prior_strength,
                            signals=signals), signals, with_score=False)
    days = np.maximum((np.asarray(block_starts, np.float64) - block_starts[0]) / DAY_MS, 1.0)
    snap.values["user_activity"] = (np.expm1(snap.values["user_n"].astype(np.float64)) / days).astype(np.float32)
    snap.prior["user_activity"] = np.zeros(n_blocks, np.float32)
    return snap


@dataclass
class Behaviour:
    """The behaviour snapshots of one build, and which columns each source kind feeds."""

    user: Snapshots
    pairs: Snapshots
    context: dict[str, tuple[Snapshots, Snapshots]]  # context column -> (item x ctx, creator x ctx)
    columns: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, log: pd.DataFrame, block_starts: list[int], cfg: Config) -> "Behaviour":
        signals = behaviour_signals(cfg)
        n_blocks = len(block_starts)
        qcfg = QualityConfig(prior_strength=cfg.quality.prior_strength, signals=signals)
        user = snapshot_user(log, block_starts, cfg.quality, signals)
        pairs = snapshot_pair_counts(log, pair_key(log["user_id"], log["creator_id"]), "uc", n_blocks, signals)
        context = {}
        for c in context_columns(cfg):
            sub = log.assign(_ik=pair_key(log["item_id"], log[c]).to_numpy(),
                             _ck=pair_key(log["creator_id"], log[c]).to_numpy())
            context[c] = (snapshot_quality(sub, "_ik", f"item_{c}", n_blocks, qcfg, signals, with_score=False),
                          snapshot_quality(sub, "_ck", f"creator_{c}", n_blocks, qcfg, signals, with_score=False))
        columns = {"user": list(user.values), "pair": list(pairs.values),
                   **{f"item_ctx:{c}": list(i.values) for c, (i, _) in context.items()},
                   **{f"creator_ctx:{c}": list(k.values) for c, (_, k) in context.items()}}
        return cls(user, pairs, context, columns)

    def gather(self, rows: pd.DataFrame, blocks: np.ndarray) -> pd.DataFrame:
        """Features of rows (user_id, item_id, creator_id, context columns) as of their blocks."""
        parts = [self.user.gather(rows["user_id"], blocks),
                 self.pairs.gather(pair_key(rows["user_id"], rows["creator_id"]), blocks)]
        for c, (items, creators) in self.context.items():
            parts.append(items.gather(pair_key(rows["item_id"], rows[c]), blocks))
            parts.append(creators.gather(pair_key(rows["creator_id"], rows[c]), blocks))
        return pd.concat(parts, axis=1)

    def serving_tables(self, block: int) -> dict[str, pd.DataFrame]:
        """The end-of-data snapshot: ``user_creator`` pairs seen at least once, and per context column the
        ``item_<ctx>`` / ``creator_<ctx>`` pairs seen at least once (keys split back into their parts)."""
        out = {"user_creator": _seen(self.pairs, block, "uc_n", ["user_id", "creator_id"])}
        for c, (items, creators) in self.context.items():
            out[f"item_{c}"] = _seen(items, block, f"item_{c}_n", ["item_id", c])
            out[f"creator_{c}"] = _seen(creators, block, f"creator_{c}_n", ["creator_id", c])
        return out

    def priors(self, block: int) -> dict[str, float]:
        """Value of every pair-keyed column for a pair never seen before ``block``."""
        snaps = [self.pairs] + [s for pair in self.context.values() for s in pair]
        return {name: float(p[block]) for s in snaps for name, p in s.prior.items()}


def _seen(snap: Snapshots, block: int, count_col: str, key_names: list[str]) -> pd.DataFrame:
    df = snap.at_block(block)
    df = df[df[count_col] > 0].reset_index(drop=True)
    parts = df.pop("id").astype(str).str.split(SEP, n=1, expand=True, regex=False)
    for i, name in enumerate(key_names):
        df.insert(i, name, parts[i] if len(df) else pd.Series(dtype=str))
    return df


def attach_serving(rows: pd.DataFrame, spec: dict, users: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Behaviour columns for later rows from the end-of-data snapshot (``spec`` = feature_spec["behaviour"]):
    user columns by user_id (NaN for a user outside the users table), pair columns by their keys (the
    prior for a pair never seen, or a row without the context column)."""
    out = {}
    upos = pd.Index(users["user_id"].astype(str)).get_indexer(rows["user_id"].astype(str))
    for c in spec["columns"]["user"]:
        vals = users[c].to_numpy(np.float32)[np.maximum(upos, 0)]
        out[c] = np.where(upos >= 0, vals, np.nan).astype(np.float32)
    keyed = [("pair", "user_creator", ["user_id", "creator_id"])]
    for kind in spec["columns"]:
        if ":" in kind:
            entity, ctx = kind.split(":", 1)
            keyed.append((kind, f"{entity.removesuffix('_ctx')}_{ctx}", [f"{entity.removesuffix('_ctx')}_id", ctx]))
    for kind, table, keys in keyed:
        t = tables[table]
        have = all(k in rows.columns for k in keys)
        pos = (pd.Index(pair_key(t[keys[0]], t[keys[1]])).get_indexer(pair_key(rows[keys[0]], rows[keys[1]]))
               if have else np.full(len(rows), -1))
        for c in spec["columns"][kind]:
            vals = t[c].to_numpy(np.float32)[np.maximum(pos, 0)] if len(t) else np.zeros(len(rows), np.float32)
            out[c] = np.where(pos >= 0, vals, np.float32(spec["priors"][c])).astype(np.float32)
    return pd.DataFrame(out, index=rows.index)
