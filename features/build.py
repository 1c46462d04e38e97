"""The feature build: raw logs -> validated canonical rows -> time split -> vocabularies -> time-correct
features -> Parquet tables + manifest under ``<output_dir>/features``.

Output tables:
- ``interactions.parquet``: one row per good impression: ids, period, block, signals, context, encoded
  indices, quality aggregates of the item and creator, fan relation and the user's history, all as of
  the row's block start.
- ``items.parquet``, ``creators.parquet``, ``users.parquet``, ``fans.parquet``: the serving snapshot
  (everything known at the end of the data), what a bundle ships for online lookups.
- ``vocab.json``, ``validation.json``, ``quarantine_*.csv``, ``manifest.json``.

Two engines write the same tables (``features.engine``): ``duckdb`` (the default, out of core:
features/engine_duckdb.py) and ``pandas`` (the whole log in memory, below; the reference the tests compare
the other against). The serving snapshot and the manifest are assembled by the same functions here.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from features.behaviour import Behaviour
from features.bundle import sha256_file
from features.config import Config, to_dict
from features.contract import CREATORS, FANS, ITEMS, MANIFEST, USERS, VOCAB
from features.fans import FAN_COLUMNS, fan_relations, fan_table
from features.history import history_before
from features.ingest import Ingested, ingest
from features.multi_valued import multi_hot_columns
from features.quality import CREATOR_PREFIX, ITEM_PREFIX, Snapshots, high_quality_creators, snapshot_quality
from features.split import PERIODS, TimeSplit, make_split
from features.vocab import Vocab, save_vocabs

FORMAT_VERSION = 1


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    skipped: bool


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def input_fingerprint(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    specs = [d.interactions, d.items] + ([d.users] if d.users else [])
    files = {s.file: sha256_file(d.path(s)) for s in specs if d.path(s).exists()}
    resolved = to_dict(cfg)
    feature_sections = {k: resolved[k] for k in ("data", "validation", "split", "vocab", "quality", "fans", "history", "behaviour")}
    feature_sections["data"] = {k: v for k, v in feature_sections["data"].items() if k != "dir"}
    return {"files": files, "config_hash": _hash_json(feature_sections), "format_version": FORMAT_VERSION}


def feature_spec(cfg: Config, vocabs: dict[str, Vocab], item_numeric: list[str],
                 behaviour: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the models consume; training builds embeddings from it and serving encodes requests with it."""
    users = cfg.data.users
    user_cat = ["user_id"] + (list(users.categorical) if users else [])
    item_cat = ["item_id", "creator_id", "category"] + list(cfg.data.items.categorical)
    context = cfg.data.context_columns
    return {
        "user_categorical": {c: len(vocabs[c]) for c in user_cat},
        "user_numeric": list(users.numeric) if users else [],
        "item_categorical": {c: len(vocabs[c]) for c in item_cat},
        "item_numeric": item_numeric + list(cfg.data.items.numeric),
        "context_categorical": {c: len(vocabs[c]) for c in context},
        "pair_numeric": list(FAN_COLUMNS),
        "history": {"column": "history", "length": cfg.history.length, "vocab": "item_id", "signal": cfg.history.signal},
        "binary_signals": cfg.data.binary_signals,
        "continuous_signals": cfg.data.continuous_signals,
        "watch_time_signal": cfg.data.interactions.watch_time_signal,
        # columns per source kind ("user", "pair", "item_ctx:<col>", "creator_ctx:<col>"), their tables and
        # the values of pairs never seen (features/behaviour.py); absent when behaviour.enabled is false
        **({"behaviour": behaviour} if behaviour else {}),
    }


def build_vocabs(cfg: Config, ing: Ingested, train_counts: Callable[[str], pd.Series]) -> dict[str, Vocab]:
    """Id and context vocabularies from ``train_counts(column)`` (occurrences per value in the train rows),
    attribute vocabularies from the item and user tables."""
    mc = cfg.vocab.min_count
    vocabs = {
        "user_id": Vocab.from_counts("user_id", train_counts("user_id"), mc),
        "item_id": Vocab.from_counts("item_id", train_counts("item_id"), mc),
        "creator_id": Vocab.from_counts("creator_id", train_counts("creator_id"), mc),
        # Attribute vocabularies come from the whole catalogue / user table: they are static, not behaviour.
        "category": Vocab.build("category", ing.items["category"]),
    }
    for c in cfg.data.items.categorical:
        vocabs[c] = Vocab.build(c, ing.items[c])
    if ing.users is not None and cfg.data.users is not None:
        for c in cfg.data.users.categorical:
            vocabs[c] = Vocab.build(c, ing.users[c])
    for c in cfg.data.context_columns:
        vocabs[c] = Vocab("hour", [str(h) for h in range(24)]) if c == "hour" else Vocab.from_counts(c, train_counts(c), mc)
    for name, buckets in cfg.vocab.hash_buckets.items():
        vocabs[name] = Vocab(name, hash_buckets=buckets)
    return vocabs


def encode_columns(df: pd.DataFrame, vocabs: dict[str, Vocab], columns: list[str]) -> None:
    for c in columns:
        df[f"{c}_idx"] = vocabs[c].encode(df[c].astype(str))


def write_table(df: pd.DataFrame, path: Path, row_group_size: int | None = None) -> dict[str, Any]:
    df.to_parquet(path, index=False, row_group_size=row_group_size)
    return table_entry(path)


def table_entry(path: Path) -> dict[str, Any]:
    """A written table as the manifest lists it."""
    meta = pq.read_metadata(path)
    return {"file": path.name, "rows": meta.num_rows, "sha256": sha256_file(path), "columns": meta.schema.to_arrow_schema().names}


def build_features(cfg: Config, force: bool = False, progress: bool = True) -> BuildResult:
    out = cfg.features_dir
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = input_fingerprint(cfg)
    manifest_path = out / MANIFEST
    if not force and manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("inputs") == fingerprint:
            return BuildResult(out, old, skipped=True)
    if cfg.features.engine == "duckdb":
        from features.engine_duckdb import build_duckdb  # duckdb is imported only by the engine that needs it

        return BuildResult(out, build_duckdb(cfg, out, fingerprint, progress), skipped=False)
    return BuildResult(out, _build_pandas(cfg, out, fingerprint, progress), skipped=False)


def _build_pandas(cfg: Config, out: Path, fingerprint: dict[str, Any], progress: bool) -> dict[str, Any]:
    """The in-memory build: the whole log in one pandas frame."""
    t0 = time.perf_counter()
    steps = ["ingest", "split + vocab", "quality", "fans", "history", "snapshot", "write"]
    bar = tqdm(total=len(steps), desc="features", disable=not progress, unit="step")

    def step(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)

    ing = ingest(cfg, out)
    log = ing.interactions.sort_values(["ts", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    step("ingest")

    split: TimeSplit = make_split(log["ts"].to_numpy(), cfg.split, cfg.data.utc_offset_hours)
    log["period"] = pd.Categorical.from_codes(split.period_of(log["ts"].to_numpy()), categories=list(PERIODS))
    log["block"] = split.block_of(log["ts"].to_numpy())
    train = log[log["period"] == "train"]
    vocabs = build_vocabs(cfg, ing, lambda c: train[c].astype(str).value_counts())
    context = cfg.data.context_columns
    if "hour" in context:
        log["hour"] = log["hour"].astype(str)
    encode_columns(log, vocabs, ["user_id", "item_id", "creator_id", *context])
    step("split + vocab")

    binary = cfg.data.binary_signals
    item_q = snapshot_quality(log, "item_id", ITEM_PREFIX, split.n_blocks, cfg.quality, binary)
    creator_q = snapshot_quality(log, "creator_id", CREATOR_PREFIX, split.n_blocks, cfg.quality, binary)
    blocks = log["block"].to_numpy()
    row_feats = [item_q.gather(log["item_id"], blocks), creator_q.gather(log["creator_id"], blocks)]
    beh = Behaviour.build(log, list(split.block_starts), cfg) if cfg.behaviour.enabled else None
    if beh is not None:
        row_feats.append(beh.gather(log, blocks))
    step("quality")

    starts = np.asarray(split.block_starts, dtype=np.int64)
    row_feats.append(_fan_rows(log, starts, cfg))
    step("fans")

    item_idx = log["item_id_idx"].to_numpy()
    ub = log[["user_id", "block"]].drop_duplicates().reset_index(drop=True)
    hist = history_before(
        log, cfg.history.signal, item_idx, ub["user_id"].to_numpy(), starts[ub["block"].to_numpy()], cfg.history.length
    )
    ub["_h"] = np.arange(len(ub))
    hrow = log[["user_id", "block"]].merge(ub, on=["user_id", "block"], how="left")["_h"].to_numpy()
    log = pd.concat([log, *row_feats], axis=1)
    log["history"] = list(hist[hrow])
    step("history")

    # Serving snapshot: everything known at the end of the data.
    end_block = split.serving_block
    items, creators, item_numeric = serving_items(cfg, ing.items, vocabs, item_q, creator_q, end_block)
    fans = fan_table(log, split.end, cfg.fans)
    users = ing.users.copy() if ing.users is not None else pd.DataFrame({"user_id": sorted(log["user_id"].unique())})
    history = history_before(log, cfg.history.signal, item_idx, users["user_id"].to_numpy(),
                             np.full(len(users), split.end), cfg.history.length)
    users = serving_users(cfg, users, vocabs, history, beh.user if beh is not None else None, end_block)
    beh_tables = beh.serving_tables(end_block) if beh is not None else {}
    step("snapshot")

    tables = {
        # ~100k-row groups: a streamed fit shuffles row groups, so smaller ones mix the log better.
        "interactions": write_table(log, out / "interactions.parquet", row_group_size=100_000),
        "items": write_table(items, out / ITEMS),
        "creators": write_table(creators, out / CREATORS),
        "users": write_table(users, out / USERS),
        "fans": write_table(fans, out / FANS),
        **{name: write_table(df, out / f"{name}.parquet") for name, df in beh_tables.items()},
    }
    periods = log.groupby("period", observed=False)["ts"].agg(["count", "min", "max"])
    behaviour = None if beh is None else {"columns": beh.columns, "tables": {k: k for k in beh_tables},
                                          "priors": beh.priors(end_block)}
    manifest = write_manifest(
        cfg, out, fingerprint, t0, split, vocabs, tables, feature_spec(cfg, vocabs, item_numeric, behaviour),
        periods, {"users": int(log["user_id"].nunique()), "items": len(items), "creators": len(creators)},
        ing.reports,
    )
    step("write")
    bar.close()
    return manifest


def _fan_rows(log: pd.DataFrame, starts: np.ndarray, cfg: Config) -> pd.DataFrame:
    """Fan relation columns of every row, as of its block's start."""
    pairs = log[["user_id", "creator_id", "block"]].drop_duplicates().reset_index(drop=True)
    pairs["cutoff"] = starts[pairs["block"].to_numpy()]
    rel = pd.concat([pairs, fan_relations(log, pairs, cfg.fans)], axis=1)
    fans_rows = log[["user_id", "creator_id", "block"]].merge(rel, on=["user_id", "creator_id", "block"], how="left")
    return fans_rows[list(FAN_COLUMNS)].reset_index(drop=True)


def serving_items(cfg: Config, raw_items: pd.DataFrame, vocabs: dict[str, Vocab], item_q: Snapshots,
                  creator_q: Snapshots, block: int) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The serving item and creator tables (quality as of snapshot ``block``) and the item numeric inputs."""
    items = raw_items.copy()
    items["category"] = items["category"].astype(str)
    encode_columns(items, vocabs, ["item_id", "creator_id", "category", *cfg.data.items.categorical])
    iq = item_q.gather(items["item_id"], np.full(len(items), block))
    cq = creator_q.gather(items["creator_id"], np.full(len(items), block))
    items = pd.concat([items, iq, cq], axis=1)
    creators = creator_q.at_block(block).rename(columns={"id": "creator_id"})
    creators["creator_idx"] = vocabs["creator_id"].encode(creators["creator_id"])
    creators["high_quality"] = high_quality_creators(creators, cfg.quality)
    items["creator_high_quality"] = items["creator_id"].isin(creators.loc[creators["high_quality"], "creator_id"])
    item_numeric = list(iq.columns) + list(cq.columns) + multi_hot_columns(raw_items, cfg.data.items)
    return items, creators, item_numeric


def serving_users(cfg: Config, users: pd.DataFrame, vocabs: dict[str, Vocab], history: np.ndarray,
                  user_snap: Snapshots | None, block: int) -> pd.DataFrame:
    """The serving user table: encoded ids and attributes, ``history`` (one row per user) and, with
    behaviour on, the user aggregates as of snapshot ``block``."""
    users["user_id_idx"] = vocabs["user_id"].encode(users["user_id"])
    if cfg.data.users is not None:
        encode_columns(users, vocabs, list(cfg.data.users.categorical))
    users["history"] = list(history)
    if user_snap is not None:
        users = pd.concat([users, user_snap.gather(users["user_id"], np.full(len(users), block))], axis=1)
    return users


def write_manifest(
    cfg: Config, out: Path, fingerprint: dict[str, Any], t0: float, split: TimeSplit, vocabs: dict[str, Vocab],
    tables: dict[str, Any], spec: dict[str, Any], periods: pd.DataFrame, entities: dict[str, int],
    reports: dict[str, Any],
) -> dict[str, Any]:
    """Write ``vocab.json`` and ``manifest.json``; ``periods`` has count, min and max ts per period."""
    save_vocabs(vocabs, out / VOCAB)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": cfg.data.name,
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "inputs": fingerprint,
        "config": to_dict(cfg),
        "split": split.to_dict(),
        "rows": {p: int(periods.loc[p, "count"]) for p in PERIODS},
        "time_ranges": {
            p: [int(periods.loc[p, "min"]), int(periods.loc[p, "max"])] for p in PERIODS if periods.loc[p, "count"] > 0
        },
        "entities": entities,
        "validation": {
            name: {"rows": r.rows, "good_rows": r.good_rows, "bad_rows": r.bad_rows, "notes": r.notes}
            for name, r in reports.items()
        },
        "tables": tables,
        "vocab_sizes": {k: len(v) for k, v in vocabs.items()},
        "feature_spec": spec,
        "schema_hash": _hash_json({"spec": spec, "tables": {k: v["columns"] for k, v in tables.items()}}),
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def load_manifest(features_dir: Path) -> dict[str, Any]:
    path = Path(features_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no feature manifest at {path}: run `python -m features build` first")
    return json.loads(path.read_text())
