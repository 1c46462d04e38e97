"""Multi-valued item attributes (a group of 0/1 flag columns, a separated string, or a Parquet list) as
normalised multi-hot numeric columns ``<name>=<value>`` over the most frequent values plus ``__other__``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.config import ItemsSpec, MultiValuedSpec
from features.read_tables import MISSING_TOKENS, DataValidationError

MULTI_OTHER = "__other__"  # the slot of a multi-valued attribute's values beyond its max_values


def value_lists(raw: pd.DataFrame, name: str, mv: MultiValuedSpec) -> list[list[str]]:
    """Each row's values of a multi-valued attribute (flag columns set to 1, or the column's items)."""
    if mv.flags:
        on = np.column_stack([pd.to_numeric(raw[f], errors="coerce").fillna(0).to_numpy() > 0 for f in mv.flags])
        return [[mv.flags[j] for j in np.flatnonzero(r)] for r in on]
    out: list[list[str]] = []
    for v in raw[mv.column]:  # type: ignore[index]
        if isinstance(v, (list, tuple, np.ndarray)):
            vals = [str(x).strip() for x in v]
        elif v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() in MISSING_TOKENS:
            vals = []
        elif mv.sep is None:
            raise DataValidationError(
                f"data.items.multi_valued.{name}: column '{mv.column}' holds text ({str(v)[:40]!r}), not a list: "
                "set 'sep' to the separator between its values"
            )
        else:
            vals = [x.strip() for x in str(v).split(mv.sep)]
        out.append([x for x in vals if x and x not in MISSING_TOKENS])
    return out


def multi_hot(name: str, lists: list[list[str]], max_values: int) -> pd.DataFrame:
    """Normalised multi-hot columns ``<name>=<value>`` over the ``max_values`` most frequent values (ties by
    value), plus ``<name>=__other__`` when some values fall outside; a row without values is all zero."""
    counts = pd.Series([x for row in lists for x in set(row)], dtype=object).value_counts()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    kept = [str(v) for v, _ in ranked[:max_values]]
    slots = kept + ([MULTI_OTHER] if len(ranked) > max_values else [])
    pos = {v: j for j, v in enumerate(kept)}
    mat = np.zeros((len(lists), len(slots)), np.float32)
    for i, row in enumerate(lists):
        for x in set(row):
            mat[i, pos.get(x, len(kept))] = 1.0
    n = mat.sum(axis=1, keepdims=True)
    mat = np.divide(mat, n, out=mat, where=n > 0)
    return pd.DataFrame(mat, columns=[f"{name}={v}" for v in slots])


def multi_hot_columns(items: pd.DataFrame, spec: ItemsSpec) -> list[str]:
    """The item table's multi-hot columns, attribute by attribute in config order."""
    return [c for name in spec.multi_valued for c in items.columns if c.startswith(f"{name}=")]
