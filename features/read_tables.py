"""Reading a declared table file (csv / tsv / parquet, compression by file name) whole or in chunks, with
the TableSpec's read options; an unreadable file is one DataValidationError naming it."""

from __future__ import annotations

import csv
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.config import ConfigError, TableSpec


_TEXT_SEPARATORS = {"csv": ",", "tsv": "\t"}
MISSING_TOKENS = {"", "nan", "NaN", "NAN", "null", "NULL", "None", "NA", "N/A"}  # text cells that mean "no value"


class DataValidationError(ValueError):
    """Too many bad rows, or a file that cannot be read as declared."""


def _text_format(path: Path) -> str:
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".zip", ".xz"):
        suffixes = suffixes[:-1]
    return "tsv" if suffixes and suffixes[-1] in (".tsv", ".tab") else "csv"


def _read_options(path: Path, spec: TableSpec) -> tuple[str, dict[str, Any]]:
    """The format of ``path`` and, for a text file, pandas' read_csv options (every column as text)."""
    fmt = spec.format
    if fmt == "auto":
        fmt = "parquet" if path.suffix == ".parquet" else _text_format(path)
    if fmt == "parquet":
        return fmt, {}
    sep = spec.sep or _TEXT_SEPARATORS[fmt]
    # Quotes mean nothing in tab- or pipe-separated dumps (MovieLens titles hold stray '"').
    quoting = csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE
    return fmt, dict(sep=sep, header=0 if spec.header else None, dtype=str, keep_default_na=False,
                     na_filter=False, encoding=spec.encoding, quoting=quoting)


@contextmanager
def _read_errors(path: Path, fmt: str, spec: TableSpec) -> Iterator[None]:
    """Turn a reader's failure into a DataValidationError (or ConfigError) that names the file."""
    try:
        yield
    except pd.errors.EmptyDataError:
        raise DataValidationError(f"{path} is empty (no header, no rows)") from None
    except LookupError:
        raise ConfigError(f"{path}: unknown encoding {spec.encoding!r} (e.g. utf-8, latin-1)") from None
    # A truncated or damaged .gz ends in EOFError / BadGzipFile (an OSError) / zlib.error deep in the reader.
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError, zlib.error, ValueError) as e:
        hint = " (set the file's encoding in the config)" if isinstance(e, UnicodeDecodeError) else ""
        raise DataValidationError(f"{path} cannot be read as {fmt}: {type(e).__name__}: {str(e)[:200]}{hint}") from None


def _name_columns(df: pd.DataFrame, spec: TableSpec, path: Path) -> pd.DataFrame:
    if spec.names:
        if len(spec.names) != len(df.columns):
            raise DataValidationError(
                f"{path}: the config names {len(spec.names)} columns, the file has {len(df.columns)}"
                + (f" (its header: {list(df.columns)[:30]})" if spec.header else "")
            )
        df.columns = list(spec.names)
    return df


def _no_rows(path: Path, columns: list[str]) -> DataValidationError:
    return DataValidationError(f"{path} has no data rows (columns: {columns[:30]})")


def read_table(path: Path, spec: TableSpec | None = None) -> pd.DataFrame:
    """Raw table with every column as text (CSV) so type errors can be counted per row, not crash the read."""
    spec = spec or TableSpec(file=path.name)
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path} (set data.dir or the file name in the config)")
    fmt, options = _read_options(path, spec)
    with _read_errors(path, fmt, spec):
        df = pd.read_parquet(path) if fmt == "parquet" else pd.read_csv(path, **options)
    df = _name_columns(df, spec, path)
    if df.empty:
        raise _no_rows(path, list(df.columns))
    return df


def iter_table(path: Path, spec: TableSpec, rows: int) -> Iterator[pd.DataFrame]:
    """The raw table of :func:`read_table`, ``rows`` at a time (the same text, column names and errors)."""
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path} (set data.dir or the file name in the config)")
    fmt, options = _read_options(path, spec)
    seen = 0
    columns: list[str] = []
    with _read_errors(path, fmt, spec):
        if fmt == "parquet":
            pf = pq.ParquetFile(path)
            # a stored pandas index is a column of the file, not of the table (a RangeIndex is a dict here)
            index_cols = {c for c in (pf.schema_arrow.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
            cols = [c for c in pf.schema_arrow.names if c not in index_cols]
            chunks: Iterator[pd.DataFrame] = (pa.Table.from_batches([b]).to_pandas()
                                              for b in pf.iter_batches(batch_size=rows, columns=cols))
            columns = cols
        else:
            chunks = pd.read_csv(path, chunksize=rows, **options)
        for chunk in chunks:
            chunk = _name_columns(chunk.reset_index(drop=True), spec, path)
            columns = list(chunk.columns)
            if len(chunk):
                seen += len(chunk)
                yield chunk
    if not seen:
        raise _no_rows(path, columns)
