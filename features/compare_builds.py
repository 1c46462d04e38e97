"""Compare two feature builds' outputs (the in-memory and the out-of-core engine must write the same tables).

    python -m features.compare_builds DIR_A DIR_B

Equal means: the same tables with the same columns, Arrow types and row order; values equal (floats
within ``rtol``); the same vocabularies, validation report, quarantine files and manifest (but for what
says when, how long and by which engine it was built, and the files' hashes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

# Manifest keys that differ between two equal builds.
VOLATILE = ("created_at", "build_seconds", "tables", "config")


def _column_diff(name: str, a: pd.Series, b: pd.Series, rtol: float) -> str | None:
    if a.dtype != b.dtype:
        return f"{name}: dtype {a.dtype} != {b.dtype}"
    if a.dtype == object and len(a) and isinstance(a.iloc[0], np.ndarray):  # history lists
        same = np.array_equal(np.stack(a.to_numpy()), np.stack(b.to_numpy()))
        return None if same else f"{name}: lists differ"
    if pd.api.types.is_float_dtype(a):
        x, y = a.to_numpy(np.float64), b.to_numpy(np.float64)
        close = np.isclose(x, y, rtol=rtol, atol=0.0) | (np.isnan(x) & np.isnan(y))
        return None if close.all() else f"{name}: {int((~close).sum())} values differ, e.g. row {np.flatnonzero(~close)[0]}"
    same = (a.astype(str).to_numpy() == b.astype(str).to_numpy())
    return None if same.all() else f"{name}: {int((~same).sum())} values differ, e.g. row {np.flatnonzero(~same)[0]}"


def compare_table(a: Path, b: Path, rtol: float = 1e-9) -> list[str]:
    """Differences between two Parquet tables (empty: equal)."""
    sa, sb = pq.read_schema(a), pq.read_schema(b)
    types_a = [(f.name, str(f.type)) for f in sa]
    types_b = [(f.name, str(f.type)) for f in sb]
    if types_a != types_b:
        return [f"{a.name}: schema {types_a} != {types_b}"]
    da, db = pd.read_parquet(a), pd.read_parquet(b)
    if len(da) != len(db):
        return [f"{a.name}: {len(da)} rows != {len(db)}"]
    diffs = [_column_diff(c, da[c], db[c], rtol) for c in da.columns]
    return [f"{a.name}: {d}" for d in diffs if d]


def compare_builds(a: Path, b: Path, rtol: float = 1e-9) -> list[str]:
    """Differences between two feature directories (empty: equal)."""
    a, b = Path(a), Path(b)
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    out = [f"manifest.{k}" for k in ma if k not in VOLATILE and ma[k] != mb.get(k)]
    out += [f"manifest.config.{k}" for k in ma["config"] if k not in ("features", "output_dir") and ma["config"][k] != mb["config"].get(k)]
    if list(ma["tables"]) != list(mb["tables"]):
        return out + [f"tables {list(ma['tables'])} != {list(mb['tables'])}"]
    for name, entry in ma["tables"].items():
        if {k: entry[k] for k in ("rows", "columns")} != {k: mb["tables"][name][k] for k in ("rows", "columns")}:
            out.append(f"manifest.tables.{name}")
        out += compare_table(a / entry["file"], b / mb["tables"][name]["file"], rtol)
    for f in ("vocab.json", "validation.json"):
        if json.loads((a / f).read_text()) != json.loads((b / f).read_text()):
            out.append(f)
    for f in sorted(p.name for p in a.glob("quarantine_*.csv")):
        if (a / f).read_bytes() != (b / f).read_bytes():
            out.append(f)
    return out


if __name__ == "__main__":
    diffs = compare_builds(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(diffs) if diffs else "equal")
    sys.exit(1 if diffs else 0)
