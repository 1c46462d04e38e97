"""Fan relations per (user, creator) as of a cutoff time.

follower: the user gave the follow signal on one of the creator's items before the cutoff.
iron fan: a follower with at least N interactions (any of the configured signals on one impression counts
once) with that creator in the D days before the cutoff.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.config import FansConfig

DAY_MS = 86_400_000
FAN_COLUMNS = ("is_fan", "is_iron_fan", "fan_interactions")


def _events(log: pd.DataFrame, cfg: FansConfig) -> pd.DataFrame:
    inter = np.zeros(len(log), dtype=bool)
    for s in cfg.interaction_signals:
        inter |= log[s].to_numpy() > 0
    # No follow signal: nobody is a fan (the relation columns stay, all zero).
    follow = log[cfg.follow_signal].to_numpy() > 0 if cfg.follow_signal else np.zeros(len(log), dtype=bool)
    keep = inter | follow
    return pd.DataFrame(
        {
            "user_id": log["user_id"].to_numpy()[keep],
            "creator_id": log["creator_id"].to_numpy()[keep],
            "ev_ts": log["ts"].to_numpy()[keep],
            "inter": inter[keep].astype(np.int32),
            "follow": follow[keep].astype(np.int32),
        }
    )


def fan_relations(log: pd.DataFrame, queries: pd.DataFrame, cfg: FansConfig) -> pd.DataFrame:
    """For each query row (user_id, creator_id, cutoff): is_fan, is_iron_fan, fan_interactions.

    Returns a frame aligned with ``queries``' rows.
    """
    ev = _events(log, cfg)
    q = queries[["user_id", "creator_id", "cutoff"]].reset_index(drop=True)
    q["_q"] = np.arange(len(q))
    m = q.merge(ev, on=["user_id", "creator_id"], how="inner")
    m = m[m["ev_ts"] < m["cutoff"]]
    window = m["ev_ts"] >= m["cutoff"] - int(cfg.iron_fan_window_days * DAY_MS)
    m = m.assign(inter_w=m["inter"] * window.to_numpy())
    agg = m.groupby("_q")[["follow", "inter_w"]].sum()
    follows = np.zeros(len(q), dtype=np.int64)
    inter = np.zeros(len(q), dtype=np.int64)
    follows[agg.index.to_numpy()] = agg["follow"].to_numpy()
    inter[agg.index.to_numpy()] = agg["inter_w"].to_numpy()
    is_fan = follows > 0
    return pd.DataFrame(
        {
            "is_fan": is_fan.astype(np.int8),
            "is_iron_fan": (is_fan & (inter >= cfg.iron_fan_min_interactions)).astype(np.int8),
            "fan_interactions": inter.astype(np.int32),
        }
    )


def fan_table(log: pd.DataFrame, cutoff: int, cfg: FansConfig) -> pd.DataFrame:
    """Every (user, creator) pair with a follow or an interaction before ``cutoff``, with its relation."""
    ev = _events(log[log["ts"] < cutoff], cfg)
    pairs = ev[["user_id", "creator_id"]].drop_duplicates().reset_index(drop=True)
    pairs["cutoff"] = cutoff
    rel = fan_relations(log, pairs, cfg)
    return pd.concat([pairs[["user_id", "creator_id"]], rel], axis=1)
