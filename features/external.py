"""Read a later log (any file that follows the dataset config) for evaluation against a trained bundle.

Rows on items the bundle does not know are counted (``unknown_items``) and left out of scoring, as are
rows that break a validation rule (counted per rule); rows of users the bundle never saw are kept and
counted (``unknown_users``): the models score them with out-of-vocabulary ids. Rows at or before the end of
the bundle's data are kept but counted (``inside_bundle_data``) with a warning: the bundle's snapshot
features already include their outcomes, so metrics on them are optimistic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from features.config import Config
from features.ingest import canonicalize_log
from features.read_tables import read_table
from features.tables import FeatureTables


def read_later_log(cfg: Config, path: str | Path, tables: FeatureTables) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Canonical rows of ``path`` with the bundle's snapshot features attached, and a data report."""
    path = Path(path)
    raw = read_table(path, cfg.data.interactions)  # the log's own separator, header and encoding
    item_creator = pd.Series(tables.items["creator_id"].to_numpy(), index=pd.Index(tables.items["item_id"]))
    rows, charger, notes = canonicalize_log(raw, cfg, path, item_creator, known_users=None)
    counts = charger.counts()
    rows = rows.sort_values(["ts", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    rows = tables.attach_snapshot(rows)
    report = {
        "log": str(path),
        "rows": len(raw),
        "impressions": len(rows),
        "users": int(rows["user_id"].nunique()),
        "unknown_users": int(rows.loc[rows["user_id_idx"] == 0, "user_id"].nunique()),
        "unknown_user_impressions": int((rows["user_id_idx"] == 0).sum()),
        "unknown_items": counts.pop("unknown_item"),
        "bad_rows": {k: v for k, v in counts.items() if k != "unknown_user"},
        "notes": notes,
        "time_range": [int(rows["ts"].min()), int(rows["ts"].max())] if len(rows) else None,
    }
    end = (tables.manifest.get("split") or {}).get("end")
    if end is not None and len(rows):
        inside = int((rows["ts"] <= end).sum())
        report["inside_bundle_data"] = inside
        if inside:
            iso = pd.Timestamp(int(end), unit="ms", tz="UTC").isoformat()
            report["warning"] = (f"{inside} of {len(rows)} impressions are at or before the end of the bundle's data "
                                 f"({iso}): its snapshot features include their outcomes, so metrics on them are "
                                 "optimistic. Evaluate on a log that starts after the bundle's data.")
    return rows, report
