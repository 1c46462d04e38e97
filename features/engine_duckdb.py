"""The out-of-core feature build (``features.engine: duckdb``): the same tables as the in-memory build,
with memory set by ``features.memory_limit`` and ``features.chunk_rows`` instead of the log's size.

1. Ingest (features/chunked_ingest.py): the log is read and validated ``chunk_rows`` at a time by the
   in-memory path's own rules; good rows go to Parquet. DuckDB finds the duplicates over all of them.
2. DuckDB (under ``memory_limit``, spilling to ``temp_dir``): split bounds, train-period vocabularies,
   integer codes for every entity and pair (in the sort order of their ids), and the log sorted by
   (ts, user_id, item_id) with each row's block and codes, written to Parquet.
3. Rows block by block, in order (features/running_state.py): each chunk gets the aggregates of the
   blocks before its own, fan relations and history from running totals; then the block is added to
   them. ``interactions.parquet`` is appended chunk by chunk. Memory: one chunk plus the entity state.
4. The serving snapshot from the final state; tables keyed by pairs are written by DuckDB.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from features.behaviour import behaviour_signals, context_columns
from features.build import (build_vocabs, encode_columns, feature_spec, serving_items, serving_users, table_entry,
                            write_manifest, write_table)
from features.chunked_ingest import first_pass, log_report, write_quarantine
from features.config import Config
from features.contract import CREATORS, FANS, ITEMS, USERS
from features.ingest import Ingested, TableReport, check_bad_share, load_items, load_users
from features.quality import CREATOR_PREFIX, ITEM_PREFIX, quality_signals
from features.running_state import RunningCounts, RunningFans, RunningHistory, RunningQuality, user_activity
from features.split import PERIODS, TimeSplit, make_split

CODES = "_codes"  # prefix of the engine's code columns in the sorted log (dropped from the output)


def _q(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def connect(cfg: Config, work: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB database file in ``work`` (so its tables spill too) under the configured budget."""
    con = duckdb.connect(str(work / "build.duckdb"))
    con.execute(f"SET memory_limit = '{cfg.features.memory_limit}'")
    con.execute(f"SET temp_directory = {_q(work / 'spill')}")
    con.execute("SET preserve_insertion_order = true")
    if cfg.features.threads:
        con.execute(f"SET threads = {int(cfg.features.threads)}")
    return con


# --------------------------------------------------------------------------- 1. ingest


def ingest_log(cfg: Config, out: Path, work: Path, con: duckdb.DuckDBPyConnection) -> Ingested:
    """Items, users and the validated log (the view ``log`` in ``con``); quarantine files and
    validation.json as features.ingest writes them."""
    items, item_report = load_items(cfg, out)
    users = load_users(cfg)
    item_creator = pd.Series(items["creator_id"].to_numpy(), index=pd.Index(items["item_id"]))
    known_users = pd.Index(users["user_id"]) if users is not None else None
    first = first_pass(cfg, item_creator, known_users, work / "canonical.parquet")
    con.execute(f"CREATE OR REPLACE VIEW canonical AS SELECT * FROM read_parquet({_q(first.path)})")
    if cfg.validation.drop_duplicates:  # every repeat of (user, item, ts) but its first occurrence
        con.execute("""CREATE OR REPLACE TABLE dups AS SELECT c._row FROM canonical c JOIN (
                         SELECT user_id, item_id, ts, min(_row) AS keep FROM canonical GROUP BY ALL HAVING count(*) > 1
                       ) d USING (user_id, item_id, ts) WHERE c._row <> d.keep ORDER BY c._row""")
    else:
        con.execute("CREATE OR REPLACE TABLE dups (_row BIGINT)")
    con.execute("CREATE OR REPLACE VIEW log AS SELECT * FROM canonical ANTI JOIN dups USING (_row)")
    dup_rows = con.execute("SELECT _row FROM dups ORDER BY _row").fetchnumpy()["_row"].astype(np.int64)
    dup_examples = write_quarantine(cfg, first, dup_rows, out / "quarantine_interactions.csv")
    notes = {}
    if cfg.data.interactions.duration_column:
        zero = con.execute("SELECT count(*) FILTER (WHERE duration_ms = 0) FROM log").fetchone()[0]
        notes["zero_duration_watch_ratio_missing"] = int(zero)
    reports: dict[str, TableReport] = {"interactions": log_report(cfg, first, dup_examples, len(dup_rows), notes),
                                       "items": item_report}
    check_bad_share(reports, cfg, out)
    return Ingested(pd.DataFrame(), items, users, reports)


# --------------------------------------------------------------------------- 2. DuckDB: split, vocab, codes


def make_split_sql(cfg: Config, con: duckdb.DuckDBPyConnection) -> TimeSplit:
    lo, hi, n = con.execute("SELECT min(ts), max(ts), count(*) FROM log").fetchone()
    return make_split(np.array([lo, hi] if n else [], np.int64), cfg.split, cfg.data.utc_offset_hours)


def train_counts(con: duckdb.DuckDBPyConnection, split: TimeSplit, column: str) -> pd.Series:
    """Occurrences of each value of ``column`` in the train rows."""
    df = con.execute(f'SELECT CAST("{column}" AS VARCHAR) AS v, count(*) AS n FROM log WHERE ts < ? GROUP BY 1',
                     [split.valid_start]).fetchdf()
    return pd.Series(df["n"].to_numpy(), index=pd.Index(df["v"].astype(object)))


def key_tables(cfg: Config) -> dict[str, list[str]]:
    """Entity and pair key tables: name -> the log columns of the key."""
    keys = {"user": ["user_id"], "item": ["item_id"], "creator": ["creator_id"], "uc": ["user_id", "creator_id"]}
    if cfg.behaviour.enabled:
        for c in context_columns(cfg):
            keys[f"item_{c}"] = ["item_id", c]
            keys[f"creator_{c}"] = ["creator_id", c]
    return keys


def write_sorted_log(con: duckdb.DuckDBPyConnection, cfg: Config, split: TimeSplit, path: Path) -> dict[str, int]:
    """Code every key (0..n-1 in the order of its ids, a pair's as its "a\\x1fb" text), write the log sorted
    by (ts, user_id, item_id) with ``block`` and the codes; returns the number of keys of each table."""
    sizes = {}
    joins, codes = [], []
    for name, cols in key_tables(cfg).items():
        quoted = ", ".join(f'"{c}"' for c in cols)
        order = " || chr(31) || ".join(f'"{c}"' for c in cols)
        con.execute(f"""CREATE OR REPLACE TABLE k_{name} AS SELECT {quoted},
                          (row_number() OVER (ORDER BY {order}) - 1)::INTEGER AS code
                        FROM (SELECT DISTINCT {quoted} FROM log)""")
        sizes[name] = con.execute(f"SELECT count(*) FROM k_{name}").fetchone()[0]
        on = " AND ".join(f'l."{c}" = k_{name}."{c}"' for c in cols)
        joins.append(f"JOIN k_{name} ON {on}")
        codes.append(f'k_{name}.code AS "{CODES}{name}"')
    starts = split.block_starts[:-1]
    block = "CASE " + " ".join(f"WHEN l.ts >= {s} THEN {j}" for j, s in reversed(list(enumerate(starts))) if j) + " ELSE 0 END"
    con.execute(f"""COPY (SELECT l.*, ({block})::SMALLINT AS block, {", ".join(codes)} FROM log l {" ".join(joins)}
                    ORDER BY l.ts, l.user_id, l.item_id, l._row) TO {_q(path)} (FORMAT parquet, ROW_GROUP_SIZE 100000)""")
    return sizes


def key_ids(con: duckdb.DuckDBPyConnection, name: str, column: str) -> pd.Index:
    return pd.Index(con.execute(f'SELECT "{column}" FROM k_{name} ORDER BY code').fetchdf()[column].astype(object))


# --------------------------------------------------------------------------- 3. rows block by block


class State:
    """Every running aggregate of one build."""

    def __init__(self, cfg: Config, sizes: dict[str, int], has_ratio: bool):
        q, k = cfg.quality, cfg.quality.prior_strength
        qs = quality_signals(q, cfg.data.binary_signals)
        self.item = RunningQuality(sizes["item"], ITEM_PREFIX, qs, has_ratio, k, q.score_weights)
        self.creator = RunningQuality(sizes["creator"], CREATOR_PREFIX, qs, has_ratio, k, q.score_weights)
        self.behaviour = cfg.behaviour.enabled
        bs = behaviour_signals(cfg)
        self.user = RunningQuality(sizes["user"], "user", bs, has_ratio, k, None)
        self.uc = RunningCounts(sizes["uc"], bs, False, np.float32)
        self.ctx = {c: (RunningQuality(sizes[f"item_{c}"], f"item_{c}", bs, has_ratio, k, None),
                        RunningQuality(sizes[f"creator_{c}"], f"creator_{c}", bs, has_ratio, k, None))
                    for c in (context_columns(cfg) if self.behaviour else [])}
        self.fans = RunningFans(sizes["uc"], cfg.fans)
        self.history = RunningHistory(sizes["user"], cfg.history.length)
        self.history_signal = cfg.history.signal

    def features(self, rows: pd.DataFrame, block: int, starts: list[int]) -> dict[str, np.ndarray]:
        """The row features of ``rows`` (one block's) as of the block's start, in the in-memory order."""
        code = lambda name: rows[CODES + name].to_numpy()  # noqa: E731
        out = self.item.columns(code("item"))[0] | self.creator.columns(code("creator"))[0]
        if self.behaviour:
            user = self.user.columns(code("user"))[0]
            out |= user | {"user_activity": user_activity(user["user_n"], starts, block)}
            out |= self.uc.raw("uc", code("uc"))
            for c, (items, creators) in self.ctx.items():
                out |= items.columns(code(f"item_{c}"))[0] | creators.columns(code(f"creator_{c}"))[0]
        out |= self.fans.relations(code("uc"), starts[block])
        return out

    def add(self, block: dict[str, np.ndarray], first_pos: int, next_cutoff: int) -> None:
        """Add one block's rows (compact columns, row order)."""
        for name, st in [("item", self.item), ("creator", self.creator)]:
            st.add(block[CODES + name], block)
        if self.behaviour:
            self.user.add(block[CODES + "user"], block)
            self.uc.add(block[CODES + "uc"], block)
            for c, (items, creators) in self.ctx.items():
                items.add(block[CODES + f"item_{c}"], block)
                creators.add(block[CODES + f"creator_{c}"], block)
        self.fans.add(block[CODES + "uc"], block, first_pos, next_cutoff)
        pos = block[self.history_signal] > 0
        self.history.add(block[CODES + "user"][pos], block["item_id_idx"][pos])


def _history_array(hist: np.ndarray) -> pa.Array:
    n, length = hist.shape
    offsets = pa.array(np.arange(0, n * length + 1, length, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(hist.reshape(-1)))


def assemble_chunk(rows: pd.DataFrame, block: int, cfg: Config, split: TimeSplit, vocabs: dict, state: State) -> pa.Table:
    """One chunk of ``interactions.parquet``: the columns of the in-memory build, in its order."""
    out = rows[[c for c in rows.columns if not c.startswith(CODES) and c not in ("_row", "block")]].copy()
    ts = out["ts"].to_numpy()
    out["period"] = pd.Categorical.from_codes(split.period_of(ts), categories=list(PERIODS))
    out["block"] = rows["block"].to_numpy(np.int16)
    context = cfg.data.context_columns
    if "hour" in context:
        out["hour"] = out["hour"].astype(str)
    encode_columns(out, vocabs, ["user_id", "item_id", "creator_id", *context])
    feats = pd.DataFrame(state.features(rows, block, list(split.block_starts)), index=out.index)
    table = pa.Table.from_pandas(pd.concat([out, feats], axis=1), preserve_index=False)
    hist = state.history.items[rows[CODES + "user"].to_numpy()]
    return table.append_column("history", _history_array(hist))


def compact(rows: pd.DataFrame, table: pa.Table, cfg: Config) -> dict[str, np.ndarray]:
    """What the state needs of a chunk's rows once its block is over."""
    cols = [c for c in rows.columns if c.startswith(CODES)] + ["ts", *cfg.data.binary_signals]
    out = {c: rows[c].to_numpy() for c in cols}
    if "watch_ratio" in rows.columns:
        out["watch_ratio"] = rows["watch_ratio"].to_numpy()
    out["item_id_idx"] = table.column("item_id_idx").to_numpy()
    return out


def write_rows(sorted_path: Path, out_path: Path, cfg: Config, split: TimeSplit, vocabs: dict, state: State,
               progress: bool) -> None:
    """Stream the sorted log through the state into ``out_path``, block after block."""
    pf = pq.ParquetFile(sorted_path)
    bar = tqdm(total=pf.metadata.num_rows, desc="features: blocks", unit="row", disable=not progress)
    writer: pq.ParquetWriter | None = None
    pending: list[dict[str, np.ndarray]] = []
    current, done = -1, 0
    starts = list(split.block_starts)

    def finish_block() -> None:
        nonlocal done
        if pending:
            block = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            state.add(block, done, starts[current + 1])
            done += len(block["ts"])
            pending.clear()

    for batch in pf.iter_batches(batch_size=cfg.features.chunk_rows):
        df = batch.to_pandas()
        blocks = df["block"].to_numpy()
        bounds = [0, *(np.flatnonzero(np.diff(blocks)) + 1), len(df)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            rows = df.iloc[lo:hi].reset_index(drop=True)
            if blocks[lo] != current:
                finish_block()
                current = int(blocks[lo])
                bar.set_postfix_str(f"block {current}")
            table = assemble_chunk(rows, current, cfg, split, vocabs, state)
            writer = writer or pq.ParquetWriter(out_path, table.schema)
            writer.write_table(table.cast(writer.schema), row_group_size=100_000)
            pending.append(compact(rows, table, cfg))
            bar.update(hi - lo)
    finish_block()
    if writer is not None:
        writer.close()
    bar.close()


# --------------------------------------------------------------------------- 4. serving snapshot


def copy_keyed(con: duckdb.DuckDBPyConnection, key: str, cols: list[str], values: dict[str, np.ndarray],
               path: Path, order: np.ndarray | None = None) -> dict[str, Any]:
    """Write the table of key ``key`` (its id columns, then ``values`` per code), rows by code (or by
    ``order``, a position per code; codes with a negative one are left out)."""
    codes = np.arange(len(next(iter(values.values()))), dtype=np.int64)
    rank = codes if order is None else order
    if not (rank >= 0).any():  # no rows: written as pandas writes an empty frame (id columns of type null)
        empty = {c: np.array([], object) for c in cols} | {k: v[:0] for k, v in values.items()}
        return write_table(pd.DataFrame(empty), path)
    v = pa.table({"code": codes, "_rank": rank, **values})
    con.register("v_table", v)
    ids = ", ".join(f'k."{c}"' for c in cols)
    reader = con.sql(f"""SELECT {ids}, v.* EXCLUDE (code, _rank) FROM k_{key} k JOIN v_table v USING (code)
                             WHERE v._rank >= 0 ORDER BY v._rank""").to_arrow_reader(100_000)
    # pandas writes its text columns as large_string: the same Arrow types as the in-memory build's tables
    schema = pa.schema([pa.field(f.name, pa.large_string()) if pa.types.is_string(f.type) else f for f in reader.schema])
    with pq.ParquetWriter(path, schema) as writer:
        for batch in reader:
            writer.write_table(pa.Table.from_batches([batch]).cast(schema))
    con.unregister("v_table")
    return table_entry(path)


def write_serving(con: duckdb.DuckDBPyConnection, cfg: Config, out: Path, split: TimeSplit, vocabs: dict,
                  ing: Ingested, state: State) -> tuple[dict[str, Any], list[str], dict[str, Any] | None, int]:
    """The serving tables (everything known at the end of the data): manifest entries, the item numeric
    inputs, the behaviour part of the feature spec, and the number of users in the log."""
    user_keys = key_ids(con, "user", "user_id")
    items, creators, item_numeric = serving_items(
        cfg, ing.items, vocabs, state.item.snapshot(key_ids(con, "item", "item_id")),
        state.creator.snapshot(key_ids(con, "creator", "creator_id")), 0)
    users = ing.users.copy() if ing.users is not None else pd.DataFrame({"user_id": user_keys.to_numpy()})
    code = user_keys.get_indexer(pd.Index(users["user_id"].astype(object)))
    history = np.where((code >= 0)[:, None], state.history.items[np.maximum(code, 0)], 0)
    user_snap = None
    if state.behaviour:
        user_snap = state.user.snapshot(user_keys)
        user_snap.values["user_activity"] = user_activity(user_snap.values["user_n"][:, 0], list(split.block_starts),
                                                          split.serving_block)[:, None]
        user_snap.prior["user_activity"] = np.zeros(1, np.float32)
    users = serving_users(cfg, users, vocabs, history, user_snap, 0)
    fans = state.fans.relations(np.arange(len(state.fans.follow)), split.end)
    tables = {"items": write_table(items, out / ITEMS), "creators": write_table(creators, out / CREATORS),
              "users": write_table(users, out / USERS),
              "fans": copy_keyed(con, "uc", ["user_id", "creator_id"], fans, out / FANS, state.fans.first_event)}
    behaviour = None
    if state.behaviour:
        everyone = lambda st: np.arange(st.n_keys)  # noqa: E731
        tables["user_creator"] = copy_keyed(con, "uc", ["user_id", "creator_id"], state.uc.raw("uc", everyone(state.uc)),
                                            out / "user_creator.parquet")
        columns = {"user": list(user_snap.values), "pair": list(state.uc.raw("uc", np.zeros(0, np.int64)))}
        names = ["user_creator"]
        priors = {c: 0.0 for c in columns["pair"]}
        for c, pair in state.ctx.items():
            for entity, st in zip(("item", "creator"), pair):
                values, prior = st.columns(everyone(st))
                tables[f"{entity}_{c}"] = copy_keyed(con, f"{entity}_{c}", [f"{entity}_id", c], values,
                                                     out / f"{entity}_{c}.parquet")
                columns[f"{entity}_ctx:{c}"] = list(values)
                names.append(f"{entity}_{c}")
                priors |= {name: float(p) for name, p in prior.items()}
        behaviour = {"columns": columns, "tables": {k: k for k in names},
                     "priors": priors}
    return tables, item_numeric, behaviour, len(user_keys)


def period_stats(con: duckdb.DuckDBPyConnection, split: TimeSplit) -> pd.DataFrame:
    """count, min and max ts per period (PERIODS order)."""
    df = con.execute("""SELECT CASE WHEN ts < ? THEN 0 WHEN ts < ? THEN 1 ELSE 2 END AS p, count(*) AS count,
                          min(ts) AS min, max(ts) AS max FROM log GROUP BY 1""",
                     [split.valid_start, split.test_start]).fetchdf().set_index("p")
    df = df.reindex(range(len(PERIODS)))
    df["count"] = df["count"].fillna(0)
    df.index = list(PERIODS)
    return df


def build_duckdb(cfg: Config, out: Path, fingerprint: dict[str, Any], progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    base = Path(cfg.features.temp_dir) if cfg.features.temp_dir else out
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="duckdb-build-", dir=base))  # canonical and sorted log, DuckDB's spill
    con = connect(cfg, work)
    try:
        ing = ingest_log(cfg, out, work, con)
        split = make_split_sql(cfg, con)
        vocabs = build_vocabs(cfg, ing, lambda c: train_counts(con, split, c))
        sizes = write_sorted_log(con, cfg, split, work / "sorted.parquet")
        has_ratio = "watch_ratio" in con.execute("SELECT * FROM log LIMIT 0").fetchdf().columns
        state = State(cfg, sizes, has_ratio)
        write_rows(work / "sorted.parquet", out / "interactions.parquet", cfg, split, vocabs, state, progress)
        serving, item_numeric, behaviour, n_users = write_serving(con, cfg, out, split, vocabs, ing, state)
        tables = {"interactions": table_entry(out / "interactions.parquet"), **serving}
        spec = feature_spec(cfg, vocabs, item_numeric, behaviour)
        entities = {"users": n_users, "items": tables["items"]["rows"], "creators": tables["creators"]["rows"]}
        manifest = write_manifest(cfg, out, fingerprint, t0, split, vocabs, tables, spec, period_stats(con, split),
                                  entities, ing.reports)
    finally:
        con.close()
        shutil.rmtree(work, ignore_errors=True)
    return manifest
