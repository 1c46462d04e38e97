"""What the retrieval stage reads of ``interactions.parquet``, and only that.

The whole table (every feature column, each row's ``history`` array, the static user and item columns
joined on) is ~1.5 kB per impression in pandas. The stage needs far less per impression:

- the log frame (:func:`training.retrieval.log.load_log`): ids, time, block, period and the signals, for the seen sets, the
  baselines, co-visitation, popularity, the prior, the evaluation sets and the per-block item quality;
- the train period's item numeric inputs, one column at a time, for the item tower's normalisation
  (:func:`item_num_stats`);
- the user columns and ``history`` of the training positives only (:func:`positive_tensors`, one record
  batch at a time; with ``training.stream`` not even those stay in memory: :class:`StreamedPositives` turns
  each streamed chunk into tensors, :func:`positive_stream`) and of a few chosen rows (:func:`user_rows`: one row per evaluated user, the refit's
  index-recall queries).

Every value is what the whole-table path computed (same rows, same order, same arithmetic), so the
metrics do not move.
"""

from __future__ import annotations


from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from features.tables import FeatureTables
from training.config import TrainConfig, TrainerConfig
from training.retrieval.data import InputLayout, ItemFeatures, TrainTensors, train_tensors
from training.retrieval.log import interactions_path, signal_columns
from training.stream import ParquetStream
from training.trainer import shard

BATCH_ROWS = 65_536


def _static_item_column(tables: FeatureTables, column: str, item_pos: np.ndarray) -> np.ndarray:
    """A static item numeric per row, as :meth:`FeatureTables.join_static` fills it (unknown item -> NaN)."""
    vals = tables.items[column].to_numpy()[np.maximum(item_pos, 0)]
    return np.where(item_pos >= 0, vals, np.nan)


def item_num_stats(tables: FeatureTables, layout: InputLayout, train: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 of each item numeric input over the ``train`` rows (NaN ignored, std < 1e-6 -> 1),
    read one column at a time: row features from the file, static ones from items.parquet."""
    path = interactions_path(tables)
    names = set(pq.read_schema(path).names)
    rows = train.index.to_numpy()
    item_pos = None
    mean = np.zeros(len(layout.item_num), np.float64)
    std = np.zeros(len(layout.item_num), np.float64)
    for j, c in enumerate(layout.item_num):
        if c in names:
            col = pd.read_parquet(path, columns=[c])[c].to_numpy(np.float64)[rows]
        else:
            if item_pos is None:
                item_pos = tables.positions("items", train["item_id"])
            col = _static_item_column(tables, c, item_pos).astype(np.float64)
        mean[j], std[j] = np.nanmean(col), np.nanstd(col)
    mean, std = np.nan_to_num(mean).astype(np.float32), np.nan_to_num(std).astype(np.float32)
    std[std < 1e-6] = 1.0
    return mean, std


def _user_read_columns(layout: InputLayout, schema: pa.Schema) -> list[str]:
    """File columns a user-tower input needs; :meth:`FeatureTables.join_static` adds the user attributes."""
    wanted = ["user_id", "item_id", layout.history, *layout.user_cat]
    return [c for c in dict.fromkeys(wanted) if c in schema.names]


def positive_tensors(cfg: TrainConfig, tables: FeatureTables, layout: InputLayout, feats: ItemFeatures,
                     period: str) -> TrainTensors:
    """The training examples of ``period`` (rows with ``retrieval.row_weights`` > 0) in file order, read one
    record batch at a time: only positive rows get their user columns joined and ``history`` materialised."""
    path = interactions_path(tables)
    pf = pq.ParquetFile(path)
    signals = signal_columns(cfg, pf.schema_arrow)
    columns = list(dict.fromkeys([*_user_read_columns(layout, pf.schema_arrow), "block", "period", *signals]))
    parts: list[TrainTensors] = []
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        frame = batch.select(["period", *signals]).to_pandas()
        weight = cfg.retrieval.row_weights(frame)
        keep = (frame["period"] == period).to_numpy() & (weight > 0)
        if keep.any():
            pos = tables.join_static(batch.filter(pa.array(keep)).to_pandas())
            parts.append(train_tensors(pos, layout, feats, weight[keep]))
    if not parts:
        return TrainTensors(torch.zeros((0, len(layout.user_cat)), dtype=torch.int64),
                            torch.zeros((0, layout.history_length), dtype=torch.int64),
                            torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                            torch.zeros(0, dtype=torch.float32))
    return TrainTensors(*(torch.cat([getattr(p, f) for p in parts]) for f in
                          ("user_cat", "history", "item_row", "block", "weight")))


@dataclass
class PositiveCounts:
    """What the loss needs to know of a period's training examples before it sees them, from the log frame."""

    examples: int  # rows with retrieval.row_weights > 0
    weight: float  # their summed weight
    freq: np.ndarray  # (N,) each catalogue row's share of the examples (the logQ correction's in-batch term)


def positive_counts(cfg: TrainConfig, feats: ItemFeatures, period_log: pd.DataFrame) -> PositiveCounts:
    """:class:`PositiveCounts` of the rows of ``period_log`` (a period of :func:`~training.retrieval.log.load_log`)."""
    w = cfg.retrieval.row_weights(period_log)
    keep = w > 0
    n = int(keep.sum())
    freq = np.bincount(feats.rows_of(period_log["item_id"].to_numpy()[keep]), minlength=len(feats.item_ids))
    return PositiveCounts(n, float(w[keep].astype(np.float32).sum()), freq / max(n, 1))


class StreamedPositives:
    """A streamed chunk of the period -> the training examples' tensors (:class:`TrainTensors` fields as arrays),
    exactly as :func:`positive_tensors` builds them; ``where`` marks the examples among a chunk's rows."""

    def __init__(self, cfg: TrainConfig, tables: FeatureTables, layout: InputLayout, feats: ItemFeatures):
        self.rc, self.tables, self.layout, self.feats = cfg.retrieval, tables, layout, feats
        schema = pq.read_schema(interactions_path(tables))
        self.columns = list(dict.fromkeys([*_user_read_columns(layout, schema), "block",
                                           *signal_columns(cfg, schema)]))

    def where(self, chunk: pd.DataFrame) -> np.ndarray:
        return self.rc.row_weights(chunk) > 0

    def __call__(self, chunk: pd.DataFrame) -> dict[str, np.ndarray]:
        tt = train_tensors(self.tables.join_static(chunk), self.layout, self.feats, self.rc.row_weights(chunk))
        return {k: v.numpy() for k, v in vars(tt).items()}


def positive_stream(cfg: TrainConfig, tables: FeatureTables, layout: InputLayout, feats: ItemFeatures, period: str,
                    examples: int, seed: int, tc: TrainerConfig) -> ParquetStream:
    """The period's training examples streamed from the file through the bounded shuffle buffer of
    ``training.stream_buffer_rows`` (this rank's stripe in a distributed fit): batches of the
    :class:`TrainTensors` fields, and memory that does not grow with the log."""
    make = StreamedPositives(cfg, tables, layout, feats)
    rank, world = shard(tc)
    return ParquetStream(interactions_path(tables), period, examples, make, cfg.retrieval.batch_size,
                         cfg.training.stream_buffer_rows, seed, rank, world, cfg.training.stream_workers,
                         columns=make.columns, where=make.where)


def user_rows(tables: FeatureTables, layout: InputLayout, row_numbers: np.ndarray) -> pd.DataFrame:
    """The user-tower columns (user categoricals, ``history``) of the file's rows ``row_numbers``, in that
    order (RangeIndex), reading only the row groups that hold them."""
    path = interactions_path(tables)
    pf = pq.ParquetFile(path)
    columns = _user_read_columns(layout, pf.schema_arrow)
    row_numbers = np.asarray(row_numbers, np.int64)
    wanted = np.unique(row_numbers)
    bounds = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    parts = []
    for g in range(pf.num_row_groups):
        local = wanted[(wanted >= bounds[g]) & (wanted < bounds[g + 1])] - bounds[g]
        if len(local):
            parts.append(pf.read_row_group(g, columns=columns).take(pa.array(local)))
    table = pa.concat_tables(parts) if parts else pf.schema_arrow.empty_table().select(columns)
    frame = tables.join_static(table.to_pandas())
    return frame.iloc[np.searchsorted(wanted, row_numbers)].reset_index(drop=True)
