"""The log's ingest for the out-of-core build, ``features.chunk_rows`` rows at a time.

Each chunk is validated by the in-memory path's own code (:func:`features.ingest.canonicalize_log`), so the
rules, their order and the canonical values are the same; only the duplicate rule needs the whole log, so
it is left to DuckDB (:func:`find_duplicates`), which sees the good rows of every chunk on disk. Bad rows
are kept as (row number, rule) while the good ones go to Parquet; the quarantine file is written by a
second pass over the raw file when there is anything to quarantine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.config import Config
from features.ingest import LOG_RULES, TableReport, canonicalize_log
from features.read_tables import iter_table

ROW = "_row"  # source row number of a canonical row (0-based, header excluded), as in the quarantine file


@dataclass
class ChunkedLog:
    """What the first pass learnt: the good rows' Parquet file and every bad row's number and rule."""

    path: Path
    rows: int = 0
    raw_columns: list[str] = field(default_factory=list)
    bad_rows: list[np.ndarray] = field(default_factory=list)  # row numbers, chunk by chunk
    bad_rules: list[np.ndarray] = field(default_factory=list)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def bad(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.concatenate(self.bad_rows) if self.bad_rows else np.zeros(0, np.int64)
        rules = np.concatenate(self.bad_rules) if self.bad_rules else np.zeros(0, object)
        return rows, rules


def _examples(into: dict[str, list[dict[str, Any]]], raw: pd.DataFrame, local: np.ndarray, rules: np.ndarray,
              offset: int, k: int) -> None:
    """Add the first ``k`` rows of each rule (row order) to ``into``, as features.ingest._report does."""
    for i, r in zip(local, rules):
        got = into.setdefault(r, [])
        if len(got) < k:
            got.append({"row": int(offset + i), **{c: str(v) for c, v in raw.iloc[i].items()}})


def first_pass(cfg: Config, item_creator: pd.Series, known_users: pd.Index | None, out: Path) -> ChunkedLog:
    """Validate the log chunk by chunk (every rule but "duplicate"); write the good canonical rows, with their
    source row number in ``_row``, to ``out``."""
    spec = cfg.data.interactions
    path = cfg.data.path(spec)
    no_dups = dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, drop_duplicates=False))
    res = ChunkedLog(out)
    writer: pq.ParquetWriter | None = None
    try:
        for raw in iter_table(path, spec, cfg.features.chunk_rows):
            rows, ch, _ = canonicalize_log(raw, no_dups, path, item_creator, known_users)
            res.raw_columns = list(raw.columns)
            bad = np.flatnonzero(~ch.good)
            res.bad_rows.append(res.rows + bad)
            res.bad_rules.append(ch.rule[bad])
            _examples(res.examples, raw, bad, ch.rule[bad], res.rows, cfg.validation.examples_per_rule)
            rows[ROW] = res.rows + np.flatnonzero(ch.good)
            res.rows += len(raw)
            if len(rows):
                table = pa.Table.from_pandas(rows, preserve_index=False)
                writer = writer or pq.ParquetWriter(out, table.schema)
                writer.write_table(table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # no good row at all: an empty file with the canonical columns
        empty, _, _ = canonicalize_log(raw.iloc[:0], no_dups, path, item_creator, known_users)
        empty[ROW] = np.zeros(0, np.int64)
        empty.to_parquet(out, index=False)
    return res


def write_quarantine(cfg: Config, first: ChunkedLog, dup_rows: np.ndarray, out: Path) -> dict[str, list[dict[str, Any]]]:
    """The quarantine file of features.ingest (raw rows with ``_rule`` and ``_row``, row order), from a second
    pass over the raw log; returns the examples of the duplicate rule."""
    rows, rules = first.bad()
    rows = np.concatenate([rows, dup_rows])
    rules = np.concatenate([rules, np.full(len(dup_rows), "duplicate", dtype=object)])
    order = np.argsort(rows, kind="stable")
    rows, rules = rows[order], rules[order]
    examples: dict[str, list[dict[str, Any]]] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    if not len(rows):
        pd.DataFrame(columns=["_rule", ROW, *first.raw_columns]).to_csv(out, index=False)
        return examples
    spec = cfg.data.interactions
    offset, header = 0, True
    for raw in iter_table(cfg.data.path(spec), spec, cfg.features.chunk_rows):
        lo, hi = np.searchsorted(rows, [offset, offset + len(raw)])
        local = rows[lo:hi] - offset
        q = raw.iloc[local].copy()
        q.insert(0, "_rule", rules[lo:hi])
        q.insert(1, ROW, rows[lo:hi])
        if len(q) or header:
            q.to_csv(out, index=False, mode="w" if header else "a", header=header)
            header = False
        is_dup = rules[lo:hi] == "duplicate"
        _examples(examples, raw, local[is_dup], rules[lo:hi][is_dup], offset, cfg.validation.examples_per_rule)
        offset += len(raw)
    return examples


def log_report(cfg: Config, first: ChunkedLog, dup_examples: dict[str, list[dict[str, Any]]], n_dups: int,
               notes: dict[str, int]) -> TableReport:
    """The interactions' TableReport, as features.ingest._report writes it."""
    _, rules = first.bad()
    counts = {r: int((rules == r).sum()) for r in LOG_RULES}
    counts["duplicate"] = n_dups
    examples = {**first.examples, **dup_examples}
    examples = {r: examples[r] for r in LOG_RULES if examples.get(r)}
    path = cfg.data.path(cfg.data.interactions)
    return TableReport(str(path), first.rows, first.rows - sum(counts.values()), counts, examples, notes)
