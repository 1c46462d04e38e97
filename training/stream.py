"""Training rows streamed from ``interactions.parquet`` (``training.stream: true``), so a fit's memory is a
bounded shuffle buffer, not the log.

:class:`ParquetStream` reads the file in record batches of ``chunk_rows`` (pyarrow), in a row-group order
shuffled per epoch, keeps one period's rows, and gives each shard (rank x data-loader worker) every S-th of
them (S = shards, the stripe rotating by epoch), turns them into model inputs with the stage's ``make``
function and emits batches drawn at random from a buffer of at most ``buffer_rows`` rows. Every shard reads
the whole file and keeps its stripe: simple, and balanced to the row, which DDP needs (a rank that ran out
of batches first would leave the others waiting at the gradient all-reduce): every shard yields exactly
:meth:`steps_per_shard` full batches per epoch. Row groups should be small (~100k rows) for the shuffle
to mix well: the log is written in time order, and the buffer only mixes rows that are read together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

Arrays = dict[str, np.ndarray]
RowFilter = Callable[[pd.DataFrame], np.ndarray]


def _arrow_lists(t: pa.DataType) -> pd.ArrowDtype | None:
    return pd.ArrowDtype(t) if pa.types.is_list(t) or pa.types.is_large_list(t) else None


def history_matrix(col: pd.Series, length: int) -> np.ndarray:
    """(N, L) int64 from a column of equal-length lists: Python objects, or Arrow-backed lists (the stream's
    chunks), which flatten without visiting each row."""
    if isinstance(col.dtype, pd.ArrowDtype):
        lists = pa.array(col.array)
        lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
        if lists.null_count == 0 and (pc.list_value_length(lists).to_numpy() == length).all():
            return lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(len(col), length)
        # ragged or null rows: the object path below raises, or the caller's length check does
    h = col.to_numpy()
    return np.stack(h).astype(np.int64) if len(h) else np.zeros((0, length), np.int64)


def iter_period(path: Path, period: str, chunk_rows: int = 65_536, row_groups: list[int] | None = None,
                arrow_lists: bool = False, columns: list[str] | None = None,
                where: RowFilter | None = None) -> Iterator[pd.DataFrame]:
    """The rows of ``period`` in record batches of at most ``chunk_rows`` (pandas, ``period`` as str).
    ``arrow_lists``: list columns (the history) stay Arrow-backed instead of becoming one Python object per
    row, which cost 20x the rest of a chunk's conversion. ``columns``: read only these (and ``period``);
    ``where``: keep only the period's rows it marks True (a boolean array per chunk)."""
    pf = pq.ParquetFile(path)
    if columns is not None:
        columns = list(dict.fromkeys(["period", *columns]))
    for batch in pf.iter_batches(batch_size=chunk_rows, row_groups=row_groups, columns=columns):
        df = batch.to_pandas(types_mapper=_arrow_lists if arrow_lists else None)
        keep = df["period"].astype(str).to_numpy() == period
        if where is not None and keep.any():
            keep &= np.asarray(where(df), bool)
        if keep.any():
            yield df[keep].reset_index(drop=True)


def read_period(path: Path, period: str) -> pd.DataFrame:
    """Every row of ``period`` (for the validation and test periods, which stay in memory)."""
    parts = list(iter_period(path, period))
    return pd.concat(parts, ignore_index=True) if parts else pq.read_schema(path).empty_table().to_pandas()


def user_sample(share: float, column: str = "user_id") -> RowFilter:
    """A row filter keeping about ``share`` of the users, each with all of its rows: the same users in every
    chunk, period and run (a fixed hash of the id, not a random draw)."""
    cut = int(round(min(max(share, 0.0), 1.0) * 1_000_000))

    def keep(df: pd.DataFrame) -> np.ndarray:
        h = pd.util.hash_array(df[column].astype(str).to_numpy(object))
        return (h % np.uint64(1_000_000)).astype(np.int64) < cut

    return keep


def read_period_bounded(path: Path, period: str, rows: int, max_rows: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The period (``rows`` of them) whole, or above ``max_rows`` (> 0) a :func:`user_sample` of about that
    many rows; with what was read: ``{"rows": read, "of_rows": rows, "user_share": share}``."""
    share = 1.0 if max_rows <= 0 or rows <= max_rows else max_rows / rows
    if share >= 1.0:
        frame = read_period(path, period)
    else:
        parts = list(iter_period(path, period, where=user_sample(share)))
        frame = pd.concat(parts, ignore_index=True) if parts else pq.read_schema(path).empty_table().to_pandas()
    return frame, {"rows": len(frame), "of_rows": int(rows), "user_share": round(share, 6)}


def sample_period(path: Path, period: str, total: int, n: int, seed: int,
                  sums: list[str] = ()) -> tuple[pd.DataFrame, dict[str, float]]:
    """About ``n`` rows of ``period`` drawn uniformly (each kept with probability n / total) in one pass,
    and the exact sum of each column in ``sums`` over the whole period."""
    gen = np.random.default_rng(seed)
    p = min(1.0, n / max(total, 1))
    parts, totals = [], dict.fromkeys(sums, 0.0)
    for df in iter_period(path, period):
        parts.append(df[gen.random(len(df)) < p])
        for c in sums:
            totals[c] += float(np.nansum(df[c].to_numpy(np.float64)))
    sample = pd.concat(parts, ignore_index=True) if parts else pq.read_schema(path).empty_table().to_pandas()
    return sample, totals


class ParquetStream(torch.utils.data.IterableDataset):
    """Batches (dicts of tensors) of one period's rows for this rank; see the module docstring."""

    def __init__(self, path: Path, period: str, rows: int, make: Callable[[pd.DataFrame], Arrays],
                 batch_size: int, buffer_rows: int, seed: int, rank: int = 0, world: int = 1, workers: int = 0,
                 chunk_rows: int = 65_536, columns: list[str] | None = None, where: RowFilter | None = None):
        self.path, self.period, self.rows, self.make = Path(path), period, rows, make
        self.columns, self.where = columns, where
        self.batch = max(1, batch_size // world)  # batch_size stays the global batch, as in-memory
        self.buffer_rows = max(buffer_rows, 2 * self.batch)
        self.seed, self.rank, self.world, self.workers = seed, rank, world, max(workers, 0)
        self.chunk_rows = chunk_rows
        self.row_groups = pq.ParquetFile(self.path).metadata.num_row_groups
        self.epoch = 0

    @property
    def shards(self) -> int:
        return self.world * max(self.workers, 1)

    def steps_per_shard(self) -> int:
        if self.shards == 1:
            return -(-self.rows // self.batch)  # one process keeps every row (the last batch partial)
        return max(1, self.rows // self.shards // self.batch)  # each shard holds rows // shards or one more

    def __len__(self) -> int:  # batches per epoch of this rank (all its workers)
        return self.steps_per_shard() * max(self.workers, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        shard = self.rank * max(self.workers, 1) + (info.id if info is not None else 0)
        gen = np.random.default_rng([self.seed, self.epoch, shard])
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.row_groups).tolist()
        steps, seen, emitted = self.steps_per_shard(), 0, 0
        buffer: list[Arrays] = []
        held = 0
        for df in iter_period(self.path, self.period, self.chunk_rows, order, arrow_lists=True, columns=self.columns,
                              where=self.where):
            mine = (np.arange(seen, seen + len(df)) + self.epoch) % self.shards == shard
            seen += len(df)
            if not mine.any():
                continue
            buffer.append(self.make(df[mine].reset_index(drop=True)))
            held += int(mine.sum())
            if held < self.buffer_rows:
                continue
            pool = _concat(buffer)
            perm = gen.permutation(held)
            # Emit all but half a buffer, which stays to mix with the rows read next.
            cut = (held - self.buffer_rows // 2) // self.batch * self.batch
            for a in range(0, cut, self.batch):
                if emitted == steps:
                    return
                yield _tensors(pool, perm[a : a + self.batch])
                emitted += 1
            rest = perm[cut:]
            buffer, held = [{k: v[rest] for k, v in pool.items()}], len(rest)
        if held and emitted < steps:
            pool = _concat(buffer)
            perm = gen.permutation(held)
            for a in range(0, held, self.batch):
                if emitted == steps or (self.shards > 1 and a + self.batch > held):
                    break
                yield _tensors(pool, perm[a : a + self.batch])
                emitted += 1
        if emitted != steps:
            raise RuntimeError(f"stream shard {shard}: {emitted} batches, expected {steps}; the period's row count "
                               f"({self.rows}, the rows kept by the filter if any) does not match {self.path}")


def _concat(parts: list[Arrays]) -> Arrays:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _tensors(pool: Arrays, idx: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in pool.items()}


class StreamEpoch(L.Callback):
    """Tells the stream which epoch starts (Lightning's own ``set_epoch`` reaches samplers, and an iterable
    dataset has none); the iterator of every epoch after the first is made after this hook."""

    def __init__(self, stream: ParquetStream):
        self.stream = stream

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.stream.set_epoch(trainer.current_epoch)


def stream_callbacks(train_dl: Any) -> list[L.Callback]:
    """What a fit over ``train_dl`` needs when its dataset is a :class:`ParquetStream` (nothing otherwise)."""
    return [StreamEpoch(train_dl.dataset)] if isinstance(train_dl.dataset, ParquetStream) else []
