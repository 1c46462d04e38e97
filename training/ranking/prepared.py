"""The ranking stage's data: inputs and labels of the three periods, built once and shared by every model
of a fit (the multi-task ranker, the single-task baselines, the GBDT), in memory or streamed from Parquet."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from features.tables import FeatureTables
from training.batches import TensorBatches, sequential_loader
from training.config import TrainConfig, TrainerConfig
from training.ranking.data import FeatureLayout
from training.ranking.model import NumericNormalizer
from training.ranking.watch_time import WatchTimeQuantiles
from training.stream import ParquetStream, read_period_bounded, sample_period
from training.trainer import batch_sampler, shard


def period_labels(rows: pd.DataFrame, heads: list[tuple[str, str]], wtq: WatchTimeQuantiles | None) -> np.ndarray:
    cols = []
    for name, kind in heads:
        if kind == "watch_time":
            assert wtq is not None
            cols.append(wtq.encode(rows["duration_ms"].to_numpy(np.float64), rows[name].to_numpy(np.float64)))
        else:
            cols.append(rows[name].to_numpy(np.float64))
    return np.stack(cols, axis=1).astype(np.float32)


class RankingData:
    """Inputs and labels of the three periods, built once and shared by every model of the run."""

    def __init__(self, cfg: TrainConfig, tables: FeatureTables, heads: list[tuple[str, str]], refit: bool = False):
        self.layout = FeatureLayout.from_tables(tables)
        self.tables, self.heads, self.training = tables, heads, cfg.training
        self.path = Path(tables.dir) / tables.manifest["tables"]["interactions"]["file"]
        binary = [n for n, k in heads if k == "binary"]
        self.eval_sample: dict[str, dict[str, Any]] = {}  # period -> what was read of it, where sampled
        if cfg.training.stream:
            # The train period stays on disk (ParquetStream); a uniform sample of it stands in for it below.
            self.train_rows = int(tables.manifest["rows"]["train"])
            sample, self.train_positives = sample_period(self.path, "train", self.train_rows,
                                                         cfg.training.stream_sample_rows, cfg.seed, binary)
            self.rows = {"train": self.layout.prepare(sample, tables)}
            for p in ("valid", "test"):
                frame, read = read_period_bounded(self.path, p, int(tables.manifest["rows"].get(p, 0)),
                                                  cfg.training.stream_eval_rows)
                self.rows[p] = self.layout.prepare(frame, tables)
                if read["user_share"] < 1.0:
                    self.eval_sample[p] = read
        else:
            inter = pd.read_parquet(self.path)
            frame = self.layout.prepare(inter, tables)
            self.rows = {p: frame[frame["period"] == p].reset_index(drop=True) for p in ("train", "valid", "test")}
            self.train_rows = len(self.rows["train"])
            self.train_positives = {n: float(np.nansum(self.rows["train"][n].to_numpy(np.float64))) for n in binary}
        for p, r in self.rows.items():
            if r.empty and not (refit and p != "train"):
                raise ValueError(f"the {p} period has no rows in {tables.dir}; check the split config")
        watch = [n for n, k in heads if k == "watch_time"]
        tr = self.rows["train"]
        rc = cfg.ranking
        self.wtq = (WatchTimeQuantiles.fit(tr["duration_ms"].to_numpy(), tr[watch[0]].to_numpy(),
                                           rc.watch_time_buckets, rc.watch_time_grid) if watch else None)
        self.inputs = {p: self.layout.arrays(r) for p, r in self.rows.items()}
        self.labels = {p: period_labels(r, heads, self.wtq) for p, r in self.rows.items()}
        self.num_stats = NumericNormalizer.statistics(self.inputs["train"]["num"])

    def _stream_arrays(self, rows: pd.DataFrame, columns: list[int]) -> dict[str, np.ndarray]:
        prepared = self.layout.prepare(rows, self.tables)
        return {**self.layout.arrays(prepared), "y": period_labels(prepared, self.heads, self.wtq)[:, columns]}

    def loaders(self, columns: list[int], batch_size: int, seed: int, tc: TrainerConfig) -> tuple[Any, Any]:
        """Training batches (this rank's shard in a distributed fit, see ``tc``; streamed from disk with
        ``training.stream``) and whole validation."""
        if self.training.stream:
            rank, world = shard(tc)
            stream = ParquetStream(self.path, "train", self.train_rows, partial(self._stream_arrays, columns=columns),
                                   batch_size, self.training.stream_buffer_rows, seed, rank, world,
                                   self.training.stream_workers)
            train = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.training.stream_workers)
        else:
            tr = self._batches("train", columns)
            train = torch.utils.data.DataLoader(tr, sampler=batch_sampler(len(tr), batch_size, True, seed, tc),
                                                batch_size=None, num_workers=0)
        if self.rows["valid"].empty:
            return train, None
        return train, sequential_loader(self._batches("valid", columns), 8192)

    def _batches(self, period: str, columns: list[int]) -> TensorBatches:
        return TensorBatches({**self.inputs[period], "y": self.labels[period][:, columns].astype(np.float32)})

