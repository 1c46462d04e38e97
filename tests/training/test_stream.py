"""The streamed training rows (training/stream.py): every shard (rank x worker) gets the same number of full
batches, the shards are disjoint and cover the period, the order changes by epoch, and the shuffle buffer
really bounds how far apart the rows of one batch were read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training.stream import ParquetStream, sample_period

N = 5000


def _log(tmp_path: Path, row_group_size: int = 700) -> tuple[Path, int]:
    period = np.where(np.arange(N) % 10 < 8, "train", "valid")
    df = pd.DataFrame({"row": np.arange(N), "period": pd.Categorical(period), "x": np.arange(N) % 2})
    path = tmp_path / "log.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=row_group_size)
    return path, int((period == "train").sum())


def _make(df: pd.DataFrame) -> dict[str, np.ndarray]:
    return {"row": df["row"].to_numpy(np.int64)}


def _rows(batches) -> list[int]:
    return [int(i) for b in batches for i in b["row"]]


def test_one_process_streams_every_train_row_once(tmp_path: Path):
    path, train = _log(tmp_path)
    s = ParquetStream(path, "train", train, _make, batch_size=128, buffer_rows=512, seed=0)
    batches = list(s)
    rows = _rows(batches)
    assert len(batches) == len(s) == -(-train // 128) and sorted(rows) == [r for r in range(N) if r % 10 < 8]
    s.set_epoch(1)
    assert _rows(list(s)) != rows


def test_ranks_and_workers_get_equal_disjoint_stripes(tmp_path: Path):
    path, train = _log(tmp_path)
    per_rank = []
    for rank in (0, 1):
        s = ParquetStream(path, "train", train, _make, batch_size=128, buffer_rows=512, seed=0, rank=rank, world=2,
                          workers=2)
        batches = list(torch.utils.data.DataLoader(s, batch_size=None, num_workers=2))
        assert len(batches) == len(s) and all(len(b["row"]) == 64 for b in batches)  # the global batch / 2
        per_rank.append(set(_rows(batches)))
    assert not per_rank[0] & per_rank[1]
    covered = len(per_rank[0] | per_rank[1])
    assert train - 4 * 64 <= covered <= train  # each of the 4 shards drops less than one batch


def test_the_buffer_bounds_the_mixing(tmp_path: Path):
    """In one row group the file is read in row order: with a small buffer a batch mixes rows read close
    together, with a buffer as large as the period it mixes the whole period."""
    path, train = _log(tmp_path, row_group_size=N)

    def spread(buffer_rows: int) -> float:
        s = ParquetStream(path, "train", train, _make, 64, buffer_rows=buffer_rows, seed=0, chunk_rows=128)
        return float(np.median([np.ptp(b["row"].numpy()) for b in s]))

    small, large = spread(256), spread(N)
    assert small < 1500 < 3000 < large, (small, large)


def test_sample_is_uniform_and_sums_are_exact(tmp_path: Path):
    path, train = _log(tmp_path)
    sample, sums = sample_period(path, "train", train, 1000, seed=1, sums=["x"])
    assert 800 < len(sample) < 1200 and set(sample["period"].astype(str)) == {"train"}
    assert sums["x"] == sum(1 for r in range(N) if r % 10 < 8 and r % 2)


def test_histories_read_as_arrow_lists_equal_the_object_path(tmp_path: Path):
    from training.stream import history_matrix, iter_period

    rng = np.random.default_rng(0)
    hist = rng.integers(0, 1000, (300, 5))
    df = pd.DataFrame({"period": ["train", "valid"] * 150, "history": list(hist)})
    path = tmp_path / "h.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=70)
    for chunk, plain in zip(iter_period(path, "train", 64, arrow_lists=True), iter_period(path, "train", 64)):
        assert isinstance(chunk["history"].dtype, pd.ArrowDtype) and plain["history"].dtype == object
        some = np.arange(len(chunk)) % 3 != 1  # a row subset, as a shard keeps: the arrow slice has offsets
        got = history_matrix(chunk["history"][some].reset_index(drop=True), 5)
        np.testing.assert_array_equal(got, history_matrix(plain["history"][some].reset_index(drop=True), 5))
    train = hist[::2]
    np.testing.assert_array_equal(np.concatenate([history_matrix(c["history"], 5)
                                                  for c in iter_period(path, "train", 64, arrow_lists=True)]), train)
    ragged = pd.Series([[1, 2], [3]], dtype=pd.ArrowDtype(pa.list_(pa.int64())))
    with pytest.raises(ValueError):
        history_matrix(ragged, 2)


def _users_log(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    users = rng.integers(0, 400, N).astype(str)
    period = np.where(np.arange(N) % 10 < 6, "train", np.where(np.arange(N) % 10 < 8, "valid", "test"))
    df = pd.DataFrame({"user_id": users, "period": pd.Categorical(period), "row": np.arange(N)})
    path = tmp_path / "users.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=700)
    return path


def test_a_bounded_period_is_whole_users_sampled_the_same_way_everywhere(tmp_path: Path):
    from training.stream import read_period_bounded

    path = _users_log(tmp_path)
    log = pd.read_parquet(path)
    valid = log[log["period"].astype(str) == "valid"]
    whole, read = read_period_bounded(path, "valid", len(valid), 0)
    assert sorted(whole["row"]) == sorted(valid["row"]) and read["user_share"] == 1.0
    whole, read = read_period_bounded(path, "valid", len(valid), len(valid))
    assert len(whole) == len(valid) and read["user_share"] == 1.0

    part, read = read_period_bounded(path, "valid", len(valid), len(valid) // 4)
    kept = set(part["user_id"])
    assert read == {"rows": len(part), "of_rows": len(valid), "user_share": 0.25}
    assert 0.15 < len(kept) / valid["user_id"].nunique() < 0.35
    assert sorted(part["row"]) == sorted(valid.loc[valid["user_id"].isin(kept), "row"])  # every row of a kept user
    test = log[log["period"].astype(str) == "test"]
    again, _ = read_period_bounded(path, "test", len(test), len(test) // 4)
    both = set(valid["user_id"]) & set(test["user_id"])
    assert kept & both == set(again["user_id"]) & both  # the same users in every period
