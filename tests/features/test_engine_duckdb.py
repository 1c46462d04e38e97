"""The out-of-core engine (features.engine: duckdb) writes what the in-memory one (pandas) writes: the same
tables, row order, dtypes and values, vocabularies, validation counts, quarantine files and manifest.

Small ``features.chunk_rows`` make chunks end inside blocks and blocks span chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.build import build_features
from features.compare_builds import compare_builds
from features.config import load_config
from features.engine_duckdb import connect
from features.read_tables import iter_table, read_table
from features.running_state import RunningHistory
from features.synthetic import WorldSpec, make_world
from tests.conftest import REPO, write_config
from tests.features.test_ingest import _corrupt


def _both(config: Path, overrides: list[str], tmp_path: Path) -> list[str]:
    dirs = []
    for engine in ("pandas", "duckdb"):
        cfg = load_config(config, overrides + [f"features.engine={engine}", f"output_dir={tmp_path / engine}"])
        dirs.append(build_features(cfg, force=True, progress=False).out_dir)
    return compare_builds(*dirs)


CASES = {
    # the corrupted log: every rule, duplicates included; chunks of 997 rows
    "kuairand": ("kuairand", ["features.chunk_rows=997"]),
    # 7-hour train blocks (fan windows and blocks not day-aligned), rare ids out of the vocabularies,
    # hashed user ids, no duplicate removal
    "alt": ("alt", ["features.chunk_rows=5000", "split.train_block_hours=7", "split.align_days=false",
                    "vocab.min_count=2", "vocab.hash_buckets={user_id: 50}", "validation.drop_duplicates=false"]),
    # MovieLens-style: headerless TSV, a derived signal, no creators, durations or context; behaviour off
    "ratings": ("ratings", ["features.chunk_rows=300", "behaviour.enabled=false"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_duckdb_build_equals_pandas_build_on_the_synthetic_world(world, tmp_path, case):
    layout, overrides = CASES[case]
    w = world if layout != "ratings" else make_world(WorldSpec(n_users=150, n_creators=30, n_items=200, days=8, seed=3))
    config = write_config(w, tmp_path, layout=layout)
    if case == "kuairand":
        log, _ = _corrupt(w.log, np.random.default_rng(3))
        log.to_csv(tmp_path / "data" / "log.csv", index=False)
    assert _both(config, overrides, tmp_path) == []


def test_duckdb_build_equals_pandas_build_on_the_shipped_sample(tmp_path):
    overrides = [f"data.dir={REPO / 'data' / 'kuairand-sample'}", "features.chunk_rows=10000"]
    assert _both(REPO / "configs" / "kuairand.yaml", overrides, tmp_path) == []


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_chunks_of_a_table_are_the_table(world, tmp_path, fmt):
    config = load_config(write_config(world, tmp_path))
    spec = config.data.interactions
    path = config.data.path(spec)
    if fmt == "parquet":
        path = path.with_suffix(".parquet")
        world.log.iloc[::-1].to_parquet(path)  # its index is stored: a column of the file, not of the table
        spec.file = path.name
    whole = read_table(path, spec).reset_index(drop=True)
    chunks = list(iter_table(path, spec, 333))
    assert max(len(c) for c in chunks) == 333
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), whole)


def test_running_history_keeps_the_last_positives_in_time_order():
    h = RunningHistory(3, 4)
    h.add(np.array([0, 1, 0, 0]), np.array([5, 6, 7, 0]))  # item 0 (out of vocabulary) still takes a slot
    np.testing.assert_array_equal(h.items, [[0, 5, 7, 0], [0, 0, 0, 6], [0, 0, 0, 0]])
    h.add(np.array([0, 0, 2]), np.array([8, 9, 4]))
    np.testing.assert_array_equal(h.items, [[7, 0, 8, 9], [0, 0, 0, 6], [0, 0, 0, 4]])
    h.add(np.array([1] * 6), np.arange(10, 16))
    np.testing.assert_array_equal(h.items[1], [12, 13, 14, 15])


def test_duckdb_runs_under_the_configured_memory_limit(world, tmp_path):
    cfg = load_config(write_config(world, tmp_path), ["features.memory_limit=300MB", "features.threads=1"])
    con = connect(cfg, tmp_path)
    limit = con.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchone()
    con.close()
    assert limit[0].replace(" ", "").startswith("286") and limit[1] == 1  # DuckDB shows 300 MB in MiB
