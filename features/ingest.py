"""Read raw tables through the declared schema and validate them at the door.

Every row that breaks a rule is counted under that rule, kept with its source row number and written to a
quarantine file; nothing is dropped silently. A run whose bad-row share exceeds
``validation.max_bad_fraction`` fails with a message naming the rules and example rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.config import Config, ItemsSpec, TableSpec
from features.multi_valued import multi_hot, value_lists
from features.read_tables import MISSING_TOKENS, DataValidationError, read_table

# Order matters: a row is charged to the first rule it breaks.
LOG_RULES = (
    "nan",  # a required value is empty or NaN
    "wrong_type",  # a value that should be a number is not
    "invalid_signal",  # a binary signal outside {0, 1}, or a negative continuous one
    "negative_duration",  # negative watch time or video length
    "unknown_item",  # item id absent from the item table
    "unknown_user",  # user id absent from the user table (when one is declared)
    "duplicate",  # repeat of (user_id, item_id, ts); the first occurrence is kept
)
ITEM_RULES = ("nan", "duplicate")

_TIME_UNIT_TO_MS = {"ms": 1.0, "s": 1000.0, "us": 0.001}
_COMPARE = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less, "==": np.equal, "!=": np.not_equal}
ITEM_CREATOR = "item:"  # creator id of an item in a log without creators: the item itself


@dataclass
class TableReport:
    file: str
    rows: int
    good_rows: int
    bad_rows: dict[str, int]
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)  # kept rows with a known quirk (e.g. zero duration)

    @property
    def bad_total(self) -> int:
        return sum(self.bad_rows.values())

    def summary(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in self.bad_rows.items() if v) or "none"
        notes = ", ".join(f"{k}={v}" for k, v in self.notes.items() if v)
        return f"{self.file}: {self.rows} rows, {self.good_rows} good, bad: {bad}" + (f"; kept with notes: {notes}" if notes else "")




def _require_columns(df: pd.DataFrame, spec: TableSpec, path: Path, extra: list[str]) -> None:
    needed = list(spec.columns.values()) + extra
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"{path}: missing column(s) {missing}; the file has {list(df.columns)[:30]}. "
            f"Fix the file or the column mapping in the config."
        )


def _is_missing(col: pd.Series) -> np.ndarray:
    if col.dtype == object or pd.api.types.is_string_dtype(col):
        s = col.astype(str).str.strip()
        return (col.isna() | s.isin(MISSING_TOKENS)).to_numpy()
    return col.isna().to_numpy()


def _to_number(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64, mask of present-but-not-a-number)."""
    num = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(num) & ~_is_missing(col)
    return num, bad


def _ids(col: pd.Series) -> pd.Series:
    """Canonical id text: '12', 12 and '12.0' are one id."""
    s = col.astype(str).str.strip()
    return s.str.replace(r"^(-?\d+)\.0+$", r"\1", regex=True)


def _known(ids: pd.Series, index: pd.Index) -> np.ndarray:
    """``ids.isin(index)`` of a unique index by hash lookup: pandas' isin on Arrow-backed strings loops in
    Python (11 s for 250k rows against 400k ids)."""
    if not index.is_unique:
        return ids.isin(index).to_numpy()
    return index.get_indexer(pd.Index(ids)) >= 0


class _Charger:
    """Assigns each bad row to the first rule it breaks."""

    def __init__(self, n: int, rules: tuple[str, ...]):
        self.rule = np.full(n, "", dtype=object)
        self.rules = rules

    def charge(self, rule: str, mask: np.ndarray) -> None:
        self.rule[mask & (self.rule == "")] = rule

    @property
    def good(self) -> np.ndarray:
        return self.rule == ""

    def counts(self) -> dict[str, int]:
        return {r: int((self.rule == r).sum()) for r in self.rules}


def _report(path: Path, raw: pd.DataFrame, charger: _Charger, k: int, notes: dict[str, int]) -> TableReport:
    examples: dict[str, list[dict[str, Any]]] = {}
    for r in charger.rules:
        idx = np.flatnonzero(charger.rule == r)[:k]
        if len(idx):
            examples[r] = [{"row": int(i), **{c: str(v) for c, v in raw.iloc[i].items()}} for i in idx]
    return TableReport(str(path), len(raw), int(charger.good.sum()), charger.counts(), examples, notes)


def _quarantine(raw: pd.DataFrame, charger: _Charger, out: Path) -> int:
    bad = ~charger.good
    q = raw[bad].copy()
    q.insert(0, "_rule", charger.rule[bad])
    q.insert(1, "_row", np.flatnonzero(bad))
    out.parent.mkdir(parents=True, exist_ok=True)
    q.to_csv(out, index=False)
    return int(bad.sum())


@dataclass
class Ingested:
    interactions: pd.DataFrame  # canonical rows, source order kept
    items: pd.DataFrame
    users: pd.DataFrame | None
    reports: dict[str, TableReport]


def _attribute(raw: pd.DataFrame, col: str, good: np.ndarray) -> np.ndarray:
    v = raw[col][good]
    return np.where(_is_missing(v), "__none__", _ids(v))


def _item_columns(spec: ItemsSpec) -> list[str]:
    """Raw columns the item table must have besides the mapped ones."""
    extra = [spec.raw(c) for c in spec.categorical + spec.numeric]
    for mv in spec.multi_valued.values():
        extra += mv.flags or [mv.column]  # type: ignore[list-item]
    return extra


def load_items(cfg: Config, quarantine_dir: Path) -> tuple[pd.DataFrame, TableReport]:
    spec = cfg.data.items
    path = cfg.data.path(spec)
    raw = read_table(path, spec)
    _require_columns(raw, spec, path, _item_columns(spec))
    cols = spec.columns
    ch = _Charger(len(raw), ITEM_RULES)
    item_raw = raw[cols["item_id"]]
    creator_raw = raw[cols["creator_id"]] if "creator_id" in cols else None
    ch.charge("nan", _is_missing(item_raw) | (_is_missing(creator_raw) if creator_raw is not None else False))
    item_id = _ids(item_raw)
    ch.charge("duplicate", item_id.duplicated(keep="first").to_numpy() & ch.good)
    _quarantine(raw, ch, quarantine_dir / "quarantine_items.csv")
    report = _report(path, raw, ch, cfg.validation.examples_per_rule, {})
    good = ch.good
    ids = item_id[good].to_numpy()
    # Without creators every item is its own creator: creator rules (fans, diversity, quality support,
    # exposure fairness) then act per item.
    creators = _ids(creator_raw)[good].to_numpy() if creator_raw is not None else np.array([ITEM_CREATOR + i for i in ids], dtype=object)
    out = pd.DataFrame({"item_id": ids, "creator_id": creators})
    out["category"] = _attribute(raw, cols["category"], good) if "category" in cols else "__none__"
    if "visible" in cols:
        visible_values = {str(v) for v in spec.visible_values} | {_ids(pd.Series([v])).iloc[0] for v in spec.visible_values}
        out["visible"] = _ids(raw[cols["visible"]][good]).isin(visible_values).to_numpy()
    else:
        out["visible"] = True
    if "duration_ms" in cols:
        out["duration_ms"] = pd.to_numeric(raw[cols["duration_ms"]][good], errors="coerce").to_numpy(np.float64)
    if "upload_date" in cols:
        up = pd.to_datetime(raw[cols["upload_date"]][good], errors="coerce", utc=True)
        out["upload_ts"] = ((up - pd.Timestamp(0, tz="UTC")).dt.total_seconds() * 1000).to_numpy() - cfg.data.utc_offset_hours * 3.6e6
    for c in spec.categorical:
        out[c] = _attribute(raw, spec.raw(c), good)
    for c in spec.numeric:
        out[c] = pd.to_numeric(raw[spec.raw(c)][good], errors="coerce").to_numpy(np.float64)
    good_raw = raw[good].reset_index(drop=True)
    out = out.reset_index(drop=True)
    parts = [multi_hot(name, value_lists(good_raw, name, mv), mv.max_values) for name, mv in spec.multi_valued.items()]
    return pd.concat([out, *parts], axis=1) if parts else out, report


def load_users(cfg: Config) -> pd.DataFrame | None:
    spec = cfg.data.users
    if spec is None:
        return None
    path = cfg.data.path(spec)
    raw = read_table(path, spec)
    _require_columns(raw, spec, path, [spec.raw(c) for c in spec.categorical + spec.numeric])
    user_id = _ids(raw[spec.columns["user_id"]])
    keep = ~_is_missing(raw[spec.columns["user_id"]]) & ~user_id.duplicated().to_numpy()
    out = pd.DataFrame({"user_id": user_id[keep].to_numpy()})
    for c in spec.categorical:
        out[c] = _attribute(raw, spec.raw(c), keep)
    for c in spec.numeric:
        out[c] = pd.to_numeric(raw[spec.raw(c)][keep], errors="coerce").to_numpy(np.float64)
    return out.reset_index(drop=True)


def canonicalize_log(
    raw: pd.DataFrame, cfg: Config, path: Path, item_creator: pd.Series, known_users: pd.Index | None
) -> tuple[pd.DataFrame, _Charger, dict[str, int]]:
    """Validate raw log rows; return canonical good rows, the rule charged to every row, and kept-row notes."""
    spec, data = cfg.data.interactions, cfg.data
    signal_cols = list(dict.fromkeys(s.column for s in data.signals.values()))
    extra = signal_cols + ([spec.duration_column] if spec.duration_column else [])
    _require_columns(raw, spec, path, extra)
    n = len(raw)
    ch = _Charger(n, LOG_RULES)
    cols = spec.columns
    required = [cols["user_id"], cols["item_id"], cols["ts"]] + signal_cols
    missing = np.zeros(n, dtype=bool)
    for c in required:
        missing |= _is_missing(raw[c])
    ch.charge("nan", missing)

    ts, bad_ts = _to_number(raw[cols["ts"]])
    values, wrong, invalid, negative = _signal_values(raw, cfg)
    wrong |= bad_ts
    duration = None
    if spec.duration_column:
        duration, bad = _to_number(raw[spec.duration_column])
        wrong |= bad
        ch.charge("nan", np.isnan(duration) & ~bad)
        negative |= duration < 0
    ch.charge("wrong_type", wrong)
    ch.charge("invalid_signal", invalid)
    ch.charge("negative_duration", negative)

    user_id = _ids(raw[cols["user_id"]])
    item_id = _ids(raw[cols["item_id"]])
    ch.charge("unknown_item", ~_known(item_id, item_creator.index))
    if known_users is not None:
        ch.charge("unknown_user", ~_known(user_id, known_users))
    ts_ms = np.round(ts * _TIME_UNIT_TO_MS[spec.time_unit])
    if cfg.validation.drop_duplicates:
        key = pd.DataFrame({"u": user_id, "i": item_id, "t": ts_ms})
        # Only rows that are otherwise good compete for "first occurrence", so a corrupted copy never
        # evicts the clean one.
        dup = np.zeros(n, dtype=bool)
        good_idx = np.flatnonzero(ch.good)
        dup[good_idx] = key.iloc[good_idx].duplicated(keep="first").to_numpy()
        ch.charge("duplicate", dup)

    good = ch.good
    out = pd.DataFrame(
        {
            "user_id": user_id[good].to_numpy(),
            "item_id": item_id[good].to_numpy(),
            "ts": ts_ms[good].astype(np.int64),
        }
    )
    out["creator_id"] = item_creator.reindex(out["item_id"]).to_numpy()
    for name, s in data.signals.items():
        v = values[name][good]
        out[name] = v.astype(np.int8) if s.kind == "binary" else v.astype(np.float32)
    return out, ch, _add_context(out, raw, good, duration, cfg)


def _signal_values(raw: pd.DataFrame, cfg: Config) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Each signal's values (derived ones compared to their threshold), and per row: a value that is not a
    number, a binary signal outside {0, 1} or a negative continuous one, a negative watch time."""
    data, spec = cfg.data, cfg.data.interactions
    n = len(raw)
    values: dict[str, np.ndarray] = {}
    wrong, invalid, negative = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    for name, s in data.signals.items():
        v, bad = _to_number(raw[s.column])
        wrong |= bad
        if s.derived:
            with np.errstate(invalid="ignore"):
                values[name] = np.where(np.isnan(v), np.nan, _COMPARE[s.op](v, s.value).astype(np.float64))
            continue
        values[name] = v
        if s.kind == "binary":
            invalid |= ~np.isnan(v) & (v != 0) & (v != 1)
        elif name == spec.watch_time_signal:
            negative |= v < 0
        else:
            invalid |= v < 0
    return values, wrong, invalid, negative


def _add_context(out: pd.DataFrame, raw: pd.DataFrame, good: np.ndarray, duration: np.ndarray | None,
                 cfg: Config) -> dict[str, int]:
    """Duration and watch ratio, the mapped context columns and the hour, onto the good rows ``out``;
    returns the notes on kept rows."""
    data, spec = cfg.data, cfg.data.interactions
    notes: dict[str, int] = {}
    if duration is not None:
        d = duration[good]
        out["duration_ms"] = d.astype(np.float32)
        if spec.watch_time_signal:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(d > 0, out[spec.watch_time_signal].to_numpy(np.float64) / d, np.nan)
            out["watch_ratio"] = ratio.astype(np.float32)
        notes["zero_duration_watch_ratio_missing"] = int((d == 0).sum())
    for canon, rawcol in spec.columns.items():
        if canon not in ("user_id", "item_id", "ts"):
            v = raw[rawcol][good]
            out[canon] = np.where(_is_missing(v), "__none__", _ids(v))
    if spec.hour_context:
        out["hour"] = (((out["ts"] + int(data.utc_offset_hours * 3_600_000)) // 3_600_000) % 24).astype(np.int8)
    return notes


def ingest(cfg: Config, out_dir: Path) -> Ingested:
    """Load items, users and the log; validate; quarantine bad rows; enforce the bad-row budget."""
    items, item_report = load_items(cfg, out_dir)
    users = load_users(cfg)
    path = cfg.data.path(cfg.data.interactions)
    raw = read_table(path, cfg.data.interactions)
    item_creator = pd.Series(items["creator_id"].to_numpy(), index=pd.Index(items["item_id"]))
    known_users = pd.Index(users["user_id"]) if users is not None else None
    log, ch, notes = canonicalize_log(raw, cfg, path, item_creator, known_users)
    _quarantine(raw, ch, out_dir / "quarantine_interactions.csv")
    log_report = _report(path, raw, ch, cfg.validation.examples_per_rule, notes)
    reports = {"interactions": log_report, "items": item_report}
    check_bad_share(reports, cfg, out_dir)
    return Ingested(log, items, users, reports)


def check_bad_share(reports: dict[str, TableReport], cfg: Config, out_dir: Path) -> None:
    """Write ``validation.json``; fail the build when a table's bad-row share exceeds
    ``validation.max_bad_fraction``."""
    (out_dir / "validation.json").write_text(json.dumps({k: asdict(v) for k, v in reports.items()}, indent=2))
    for name, rep in reports.items():
        frac = rep.bad_total / max(rep.rows, 1)
        if frac > cfg.validation.max_bad_fraction:
            worst = sorted(((v, k) for k, v in rep.bad_rows.items() if v), reverse=True)
            detail = "; ".join(
                f"rule '{k}': {v} rows, e.g. {json.dumps(rep.examples.get(k, [])[:2])}" for v, k in worst
            )
            raise DataValidationError(
                f"{rep.file}: {rep.bad_total} of {rep.rows} {name} rows ({frac:.2%}) are bad, above "
                f"validation.max_bad_fraction={cfg.validation.max_bad_fraction}. {detail}. "
                f"All bad rows are in {out_dir}/quarantine_{name}.csv"
            )
