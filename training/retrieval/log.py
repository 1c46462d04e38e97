"""The interaction log as the retrieval stage reads it: ids, time, period and signals, no tower inputs (no
torch, so the offline evaluation reads it the same way)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.quality import quality_signals
from features.tables import FeatureTables
from training.config import TrainConfig

LOG_KEYS = ["user_id", "item_id", "creator_id", "ts", "block", "period"]


def interactions_path(tables: FeatureTables) -> Path:
    return tables.dir / tables.manifest["tables"]["interactions"]["file"]


def signal_columns(cfg: TrainConfig, schema: pa.Schema) -> list[str]:
    """The signal columns the stage reads: binary signals (training weights, positives, quality rates) and
    ``watch_ratio`` where the table has it (the quality snapshots aggregate it then)."""
    rc = cfg.retrieval
    names = [*cfg.data.binary_signals, *quality_signals(cfg.quality, cfg.data.binary_signals),
             rc.positive_signal, *rc.signal_weights, "watch_ratio"]
    return [c for c in dict.fromkeys(names) if c in schema.names]


def load_log(cfg: TrainConfig, tables: FeatureTables) -> pd.DataFrame:
    """Every row's ids, ``ts``, ``block``, ``period`` (categorical) and signals, in file order (index = row
    number in the file)."""
    path = interactions_path(tables)
    columns = LOG_KEYS + signal_columns(cfg, pq.read_schema(path))
    return pd.read_parquet(path, columns=columns)


def period_rows(rows: pd.DataFrame, period: str) -> pd.DataFrame:
    """The rows of one period; ``rows`` itself (no copy) when every row is in it, as in a refit."""
    mask = (rows["period"] == period).to_numpy()
    return rows if mask.all() else rows[mask]
