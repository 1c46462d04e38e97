"""Typed configuration: dataclasses are the schema, YAML holds the values.

Every CLI loads one YAML file, applies ``--set dotted.key=value`` overrides and builds a dataclass tree.
Unknown keys are errors that name the key. Each layer owns its sections: ``features`` knows the data-side
ones; ``training`` and ``serving`` subclass :class:`Config` to add theirs, and a section that belongs to
another layer is carried as raw YAML here (``OTHER_LAYER_SECTIONS``) and checked by the layer that owns it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

# The loader is re-exported: every layer imports its config API from this module.
from features.typed_config import (ConfigError, T, apply_overrides, from_dict, load_raw, parse_override,  # noqa: F401
                                   to_dict)

# --------------------------------------------------------------------------- data-side sections


@dataclass
class SignalSpec:
    """A feedback signal read from ``column``; with ``op`` and ``value`` a binary signal derived from it
    (``like: {column: rating, op: ">=", value: 4}``: 1 where rating >= 4)."""

    column: str
    kind: Literal["binary", "continuous"] = "binary"
    op: Literal[">=", ">", "<=", "<", "==", "!="] | None = None
    value: float | None = None

    @property
    def derived(self) -> bool:
        return self.op is not None


@dataclass
class TableSpec:
    """One input file, how to read it, and how its raw columns map to canonical names (canonical: raw).

    ``format: auto`` reads ``.parquet`` as Parquet, ``.tsv`` / ``.tab`` (compressed or not) as tab-separated
    and anything else as comma-separated; ``sep`` overrides the separator of a text file (``"|"``,
    ``"\t"``); ``header: false`` with ``names`` reads a file without a header row; compression (``.gz``,
    ``.bz2``, ``.zip``, ``.xz``) follows the file name.
    """

    file: str
    columns: dict[str, str] = field(default_factory=dict)
    format: Literal["auto", "csv", "tsv", "parquet"] = "auto"
    sep: str | None = None
    header: bool = True
    names: list[str] = field(default_factory=list)  # raw column names of a file without a header row
    encoding: str = "utf-8"

    def raw(self, name: str) -> str:
        """Raw column of canonical ``name``: its mapping in ``columns``, else the raw column of that name."""
        return self.columns.get(name, name)


@dataclass
class MultiValuedSpec:
    """A multi-valued attribute (genres, tags): a string ``column`` split on ``sep`` (a list column of a
    Parquet file needs no ``sep``), or a group of 0/1 ``flags`` columns, one per value. It enters the models
    as a normalised multi-hot vector over its ``max_values`` most frequent values (the rest pooled into one
    "other" slot): through the first linear layer that is the mean of the values' embeddings."""

    column: str | None = None
    sep: str | None = None
    flags: list[str] = field(default_factory=list)
    max_values: int = 64


@dataclass
class InteractionsSpec(TableSpec):
    time_unit: Literal["ms", "s", "us"] = "ms"
    duration_column: str | None = None  # raw column with the item length, for watch ratio
    watch_time_signal: str | None = None  # the continuous signal holding watch time (ms)
    # Context the ranker reads: every mapped column besides user_id, item_id and ts (e.g. tab), plus the
    # local hour of the impression when this is true (read from the clock at serving time).
    hour_context: bool = False


@dataclass
class ItemsSpec(TableSpec):
    visible_values: list[Any] = field(default_factory=lambda: [0])  # raw status values meaning "visible"
    # Extra attributes, by canonical name: mapped in ``columns`` or, if not, the raw column of that name.
    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    multi_valued: dict[str, MultiValuedSpec] = field(default_factory=dict)


@dataclass
class UsersSpec(TableSpec):
    categorical: list[str] = field(default_factory=list)  # as for items: canonical name or raw column
    numeric: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    dir: str = "data"
    name: str = "dataset"
    interactions: InteractionsSpec = field(default_factory=lambda: InteractionsSpec(file="log.csv"))
    items: ItemsSpec = field(default_factory=lambda: ItemsSpec(file="items.csv"))
    users: UsersSpec | None = None
    signals: dict[str, SignalSpec] = field(default_factory=dict)
    utc_offset_hours: float = 0.0  # local time of the logs, for day boundaries and the hour feature

    def path(self, spec: TableSpec) -> Path:
        return Path(self.dir) / spec.file

    @property
    def context_columns(self) -> list[str]:
        """Request context the ranker reads: mapped log columns besides the ids and time, then ``hour``."""
        cols = [c for c in self.interactions.columns if c not in ("user_id", "item_id", "ts")]
        return cols + (["hour"] if self.interactions.hour_context else [])

    @property
    def binary_signals(self) -> list[str]:
        return [n for n, s in self.signals.items() if s.kind == "binary"]

    @property
    def continuous_signals(self) -> list[str]:
        return [n for n, s in self.signals.items() if s.kind == "continuous"]


@dataclass
class ValidationConfig:
    max_bad_fraction: float = 0.05  # above this share of bad rows the build fails
    drop_duplicates: bool = True  # (user, item, ts) repeats are quarantined as rule "duplicate"
    examples_per_rule: int = 3


@dataclass
class SplitConfig:
    """train < valid_start <= valid < test_start <= test.

    ``mode: dates`` takes ISO dates (local time, ``data.utc_offset_hours``) or epoch ms; ``mode: fractions``
    cuts the time range into ``valid_fraction`` and ``test_fraction`` tails, rounded to whole days when
    ``align_days``; ``mode: all`` puts every row in train (validation and test empty): the production
    refit, whose epochs and calibration were chosen by a held-out fit.
    """

    mode: Literal["dates", "fractions", "all"] = "fractions"
    valid_start: str | int | None = None
    test_start: str | int | None = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.2
    align_days: bool = True
    train_block_hours: float = 24.0  # train rows get features from snapshots taken this often


@dataclass
class QualityConfig:
    """Smoothed per-item and per-creator user-experience rates and the score built from them."""

    prior_strength: float = 20.0  # pseudo-impressions at the global rate
    signals: list[str] = field(default_factory=list)  # binary signals to aggregate; empty = all binary
    score_weights: dict[str, float] = field(default_factory=dict)  # rate name -> weight in quality_score
    high_quality_quantile: float = 0.8  # creators above this quantile of score are "high quality"
    min_creator_impressions: int = 20


@dataclass
class FansConfig:
    follow_signal: str | None = None  # None: the log has no follows, so nobody is a fan
    interaction_signals: list[str] = field(default_factory=list)
    iron_fan_min_interactions: int = 3
    iron_fan_window_days: float = 14.0


@dataclass
class VocabConfig:
    min_count: int = 1  # ids seen fewer times in the train period map to the OOV index 0
    # Id vocabularies hashed into a fixed number of buckets (features/vocab.py), e.g. {item_id: 1000000}:
    # the table size comes from here, not from the catalogue; min_count does not apply to them.
    hash_buckets: dict[str, int] = field(default_factory=dict)

    HASHABLE: ClassVar[tuple[str, ...]] = ("user_id", "item_id", "creator_id")


@dataclass
class HistoryConfig:
    signal: str | None = None  # which positive feedback enters a user's history; None = the first binary signal
    length: int = 20


@dataclass
class BehaviourConfig:
    """User-side behaviour aggregates (features/behaviour.py): per user, per (user, creator), per (item or
    creator, context column)."""

    enabled: bool = True
    signals: list[str] = field(default_factory=list)  # binary signals to aggregate; empty = all binary


@dataclass
class FeaturesConfig:
    """How the feature build runs (not what it computes: both engines write the same tables).

    ``engine: pandas`` holds the whole log in memory; ``engine: duckdb`` (features/engine_duckdb.py) reads
    the log in chunks, sorts, dedupes and aggregates it in DuckDB under ``memory_limit`` (spilling to
    ``temp_dir``), and assembles the rows block by block, ``chunk_rows`` at a time."""

    engine: Literal["pandas", "duckdb"] = "duckdb"
    memory_limit: str = "2GB"  # DuckDB's budget (SET memory_limit): "2GB", "500MB"
    threads: int | None = None  # DuckDB threads; None: one per core
    temp_dir: str | None = None  # work files (the log sorted, DuckDB's spill) go in a fresh folder here; None: <output_dir>/features
    chunk_rows: int = 250_000  # rows read, validated and assembled at a time


@dataclass
class Config:
    """Root config as the features layer sees it."""

    OTHER_LAYER_SECTIONS: ClassVar[frozenset[str]] = frozenset(
        {"retrieval", "ranking", "tracking", "training", "trainer", "serving", "policy"}
    )

    output_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    fans: FansConfig = field(default_factory=FansConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    # Raw sections owned by other layers, kept so that a resolved config can be written out whole.
    other: dict[str, Any] = field(default_factory=dict)

    @property
    def features_dir(self) -> Path:
        return Path(self.output_dir) / "features"

    def validate(self) -> None:
        d = self.data
        for name in ("user_id", "item_id", "ts"):
            if name not in d.interactions.columns:
                raise ConfigError(f"data.interactions.columns must map '{name}' to a raw column")
        if "item_id" not in d.items.columns:
            raise ConfigError("data.items.columns must map 'item_id' to a raw column")
        if d.users is not None and "user_id" not in d.users.columns:
            raise ConfigError("data.users.columns must map 'user_id' to a raw column")
        for where, spec in self._tables():
            if not spec.header and not spec.names:
                raise ConfigError(f"{where}.header is false: list the file's columns in {where}.names")
            if spec.names and len(set(spec.names)) != len(spec.names):
                raise ConfigError(f"{where}.names repeats a column: {spec.names}")
            if spec.sep is not None and len(spec.sep) != 1:
                raise ConfigError(f"{where}.sep must be one character, got {spec.sep!r}")
        if d.interactions.hour_context and "hour" in d.interactions.columns:
            raise ConfigError("data.interactions.columns maps 'hour' and hour_context adds one: rename the column")
        if not d.signals:
            raise ConfigError("data.signals is empty: declare at least one feedback signal")
        for name, sig in d.signals.items():
            if (sig.op is None) != (sig.value is None):
                raise ConfigError(f"data.signals.{name}: a derived signal needs both 'op' and 'value'")
            if sig.derived and sig.kind != "binary":
                raise ConfigError(f"data.signals.{name}: a derived signal (op, value) is binary; drop kind or set binary")
        for name, mv in d.items.multi_valued.items():
            where = f"data.items.multi_valued.{name}"
            if (mv.column is None) == (not mv.flags):
                raise ConfigError(f"{where}: give either 'column' (with 'sep' for a string column) or 'flags'")
            if mv.max_values < 1:
                raise ConfigError(f"{where}.max_values must be >= 1, got {mv.max_values}")
            if name in d.items.categorical or name in d.items.numeric:
                raise ConfigError(f"{where}: '{name}' is also listed in data.items.categorical/numeric")
        binary = d.binary_signals
        if self.history.signal is None:
            if not binary:
                raise ConfigError("data.signals has no binary signal for history.signal; declare one")
            self.history.signal = binary[0]
        roles = [("history.signal", self.history.signal)]
        if self.fans.follow_signal is not None:
            roles.append(("fans.follow_signal", self.fans.follow_signal))
        roles += [(f"fans.interaction_signals[{i}]", s) for i, s in enumerate(self.fans.interaction_signals)]
        roles += [(f"quality.signals[{i}]", s) for i, s in enumerate(self.quality.signals)]
        roles += [(f"behaviour.signals[{i}]", s) for i, s in enumerate(self.behaviour.signals)]
        for role, sig in roles:
            if sig not in binary:
                raise ConfigError(f"{role} = '{sig}' is not a declared binary signal; binary signals: {binary}")
        ws = d.interactions.watch_time_signal
        if ws is not None and d.signals.get(ws, SignalSpec("", "binary")).kind != "continuous":
            raise ConfigError(f"data.interactions.watch_time_signal = '{ws}' must name a continuous signal")
        if ws is not None and d.interactions.duration_column is None:
            raise ConfigError("data.interactions.watch_time_signal needs data.interactions.duration_column "
                              "(watch time is modelled against the item's length)")
        has_ratio = d.interactions.watch_time_signal is not None and d.interactions.duration_column is not None
        rates = set(self.quality.signals or binary) | ({"watch_ratio"} if has_ratio else set())
        for name in self.quality.score_weights:
            if name not in rates:
                raise ConfigError(f"quality.score_weights names '{name}', not an aggregated rate; known: {sorted(rates)}")
        if not 0 <= self.validation.max_bad_fraction <= 1:
            raise ConfigError("validation.max_bad_fraction must be in [0, 1]")
        for name, buckets in self.vocab.hash_buckets.items():
            if name not in VocabConfig.HASHABLE:
                raise ConfigError(f"vocab.hash_buckets.{name}: only {list(VocabConfig.HASHABLE)} can be hashed")
            if buckets < 1:
                raise ConfigError(f"vocab.hash_buckets.{name} must be >= 1, got {buckets}")
        f = self.features
        if f.chunk_rows < 1:
            raise ConfigError(f"features.chunk_rows must be >= 1, got {f.chunk_rows}")
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B|B)", f.memory_limit.strip(), flags=re.IGNORECASE):
            raise ConfigError(f"features.memory_limit must be a size such as '2GB' or '500MB', got '{f.memory_limit}'")
        if f.threads is not None and f.threads < 1:
            raise ConfigError(f"features.threads must be >= 1 (or null: one per core), got {f.threads}")
        if self.split.mode == "dates" and (self.split.valid_start is None or self.split.test_start is None):
            raise ConfigError("split.mode = dates needs split.valid_start and split.test_start")

    def _tables(self) -> list[tuple[str, TableSpec]]:
        d = self.data
        out: list[tuple[str, TableSpec]] = [("data.interactions", d.interactions), ("data.items", d.items)]
        return out + ([("data.users", d.users)] if d.users is not None else [])


def load_config(path: str | Path, overrides: list[str] | None = None, cls: type[T] = Config) -> T:  # type: ignore[assignment]
    cfg = from_dict(cls, load_raw(path, overrides))
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg
