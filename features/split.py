"""Time split and feature snapshot blocks.

``train < valid_start <= valid < test_start <= test`` (``mode: all``: every row is train). Features of a row are computed from a snapshot
taken at the start of the row's *block*: the train period is cut into blocks of
``split.train_block_hours``; the validation and the test period are one block each, so every aggregate
used for a period's rows comes only from data before that period starts. One more block after the data
holds the serving snapshot (everything known at the cutoff).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np

from features.config import ConfigError, SplitConfig

DAY_MS = 86_400_000
PERIODS = ("train", "valid", "test")


@dataclass(frozen=True)
class TimeSplit:
    start: int  # first ts (ms) of the data
    valid_start: int
    test_start: int
    end: int  # last ts + 1
    block_starts: tuple[int, ...]  # snapshot times; last one is the serving snapshot (= end)

    @property
    def n_blocks(self) -> int:
        return len(self.block_starts)

    @property
    def serving_block(self) -> int:
        return self.n_blocks - 1

    def period_of(self, ts: np.ndarray) -> np.ndarray:
        return np.where(ts < self.valid_start, 0, np.where(ts < self.test_start, 1, 2)).astype(np.int8)

    def block_of(self, ts: np.ndarray) -> np.ndarray:
        starts = np.asarray(self.block_starts[:-1], dtype=np.int64)
        return (np.searchsorted(starts, ts, side="right") - 1).astype(np.int16)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_starts"] = list(self.block_starts)
        d["iso"] = {k: iso(d[k]) for k in ("start", "valid_start", "test_start", "end")}
        return d


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def _to_ms(value: str | int, offset_ms: int, key: str) -> int:
    if isinstance(value, int):
        return value
    try:
        dt = datetime.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"split.{key} = {value!r} is neither epoch ms nor an ISO date") from None
    if dt.tzinfo is None:  # local time of the logs
        return int(dt.replace(tzinfo=timezone.utc).timestamp() * 1000) - offset_ms
    return int(dt.timestamp() * 1000)


def _floor_day(ms: int, offset_ms: int) -> int:
    return (ms + offset_ms) // DAY_MS * DAY_MS - offset_ms


def make_split(ts: np.ndarray, cfg: SplitConfig, utc_offset_hours: float) -> TimeSplit:
    if len(ts) == 0:
        raise ConfigError("cannot split an empty log")
    offset = int(utc_offset_hours * 3_600_000)
    start, end = int(ts.min()), int(ts.max()) + 1
    if cfg.mode == "all":  # production refit: no held-out periods, snapshots up to the end
        valid_start = test_start = end
    elif cfg.mode == "dates":
        valid_start = _to_ms(cfg.valid_start, offset, "valid_start")  # type: ignore[arg-type]
        test_start = _to_ms(cfg.test_start, offset, "test_start")  # type: ignore[arg-type]
    else:
        if not (0 <= cfg.valid_fraction and 0 < cfg.test_fraction and cfg.valid_fraction + cfg.test_fraction < 1):
            raise ConfigError("split fractions must satisfy 0 <= valid, 0 < test, valid + test < 1")
        span = end - start
        valid_start = int(start + span * (1 - cfg.valid_fraction - cfg.test_fraction))
        test_start = int(start + span * (1 - cfg.test_fraction))
        if cfg.align_days:
            valid_start = _floor_day(valid_start + DAY_MS // 2, offset)
            test_start = _floor_day(test_start + DAY_MS // 2, offset)
    if cfg.mode != "all" and not start < valid_start <= test_start < end:
        raise ConfigError(
            f"split boundaries must satisfy data start {iso(start)} < valid_start {iso(valid_start)} "
            f"<= test_start {iso(test_start)} < data end {iso(end)}"
        )
    block = int(cfg.train_block_hours * 3_600_000)
    if block <= 0:
        raise ConfigError("split.train_block_hours must be positive")
    first = _floor_day(start, offset)
    train_blocks = list(range(first, valid_start, block))
    starts = train_blocks + [valid_start, test_start, end]
    return TimeSplit(start, valid_start, test_start, end, tuple(int(s) for s in starts))
