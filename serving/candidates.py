"""Multi-channel candidates per request: two-tower ANN, co-visitation from the user's recent positives,
trending and fresh lists, the MF channel (the ALS factors of the served vectors alone), merged with
per-channel quotas (:func:`features.candidates.merge_channels`,
the same code the offline evaluation measured), minus everything the user has already seen.

"Seen" = the items the bundle's data showed the user (``channels.npz``), the request's
``exclude_item_ids`` and ``seen_item_ids``, and the ``seen_item_ids`` of the user's earlier requests
within ``serving.seen_window_s`` (:class:`SeenMemory`, bounded in users and items per user).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

import numpy as np

from features.candidates import ChannelTables, channel_order, covisit_top, history_weights, merge_channels, mf_top

if TYPE_CHECKING:
    from serving.bundle import Bundle
    from serving.config import ServingConfig

CHANNEL_REASONS = ("channel:ann", "channel:covisit", "channel:trending", "channel:fresh", "channel:mf",
                   "channel:exposure")


class SeenMemory:
    """Items each user reported as seen, remembered for ``window_s`` seconds; least recently active users
    are dropped beyond ``max_users`` and each user keeps at most ``max_items`` (the newest)."""

    def __init__(self, window_s: float, max_users: int, max_items: int, clock=time.monotonic):
        self.window_s, self.max_users, self.max_items = window_s, max_users, max_items
        self._clock = clock
        self._users: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._users)

    def add_and_get(self, user_id: str, item_ids: Sequence[str]) -> list[str]:
        """Remember ``item_ids`` for the user; return every item remembered for them, expired ones dropped."""
        now = self._clock()
        with self._lock:
            items = self._users.pop(user_id, None)
            if items is None:
                if not item_ids:
                    return []
                items = OrderedDict()
            for i in item_ids:
                items.pop(i, None)
                items[i] = now
            while items and next(iter(items.values())) < now - self.window_s:
                items.popitem(last=False)
            while len(items) > self.max_items:
                items.popitem(last=False)
            if items:
                self._users[user_id] = items  # most recently active last
            while len(self._users) > self.max_users:
                self._users.popitem(last=False)
            return list(items)


def available_channels(b: "Bundle", serving: "ServingConfig") -> set[str]:
    """The channels ``b`` can serve: the ANN always, the table channels with ``channels.npz``, the MF channel
    with MF dimensions on a catalogue of at most ``serving.mf_channel_max_items`` items."""
    out = {"ann"}
    if b.channels is not None:
        out |= {"covisit", "trending", "fresh"}
    if b.mf_items is not None and b.n_items <= serving.mf_channel_max_items:
        out.add("mf")
    return out


def channel_quotas(configured: dict[str, int], bundle_quotas: dict[str, int] | None, total: int,
                   available: set[str]) -> dict[str, int]:
    """Config quotas win; else the bundle's mix (chosen on validation) scaled to ``total`` candidates (the
    ANN takes the rounding). The quota of a channel the bundle cannot serve (not in ``available``: no
    channel tables, no MF dimensions) goes to the ANN."""
    if configured:
        out = dict(configured)
    elif bundle_quotas and sum(bundle_quotas.values()) > 0:
        scale = total / sum(bundle_quotas.values())
        out = {name: int(q * scale) for name, q in bundle_quotas.items()}
        out["ann"] = out.get("ann", 0) + total - sum(out.values())
    else:
        return {"ann": total}
    for name in [n for n in out if n != "ann" and n not in available]:
        out["ann"] = out.get("ann", 0) + out.pop(name)
    return out


def merge_for_user(tables: ChannelTables | None, quotas: dict[str, int], ann: np.ndarray, history: np.ndarray,
                   idx_to_row: np.ndarray, blocked: np.ndarray,
                   mf: tuple[np.ndarray, np.ndarray] | None = None, fill: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(rows, reason index into CHANNEL_REASONS) of the merged candidates for one request; ``mf`` is
    (the user's MF factors, the items' (N, f)) for the MF channel; ``fill``: the ANN fills what the
    channels leave of the quotas' total (``ann`` must then reach that far)."""
    lists = {"ann": ann}
    if mf is not None and quotas.get("mf", 0) > 0:
        lists["mf"] = mf_top(mf[0], mf[1], blocked, sum(quotas.values()))  # past what earlier channels take
    if tables is not None:
        if quotas.get("covisit", 0) > 0:
            items, w = history_weights(history)
            ok = items < len(idx_to_row)
            rows, w = idx_to_row[items[ok]], w[ok]
            keep = rows >= 0
            lists["covisit"] = covisit_top(tables.covisit, rows[keep], w[keep], quotas["covisit"] + 50)
        n = max(quotas.get("trending", 0), quotas.get("fresh", 0)) + 1000
        lists["trending"], lists["fresh"] = tables.trending[:n], tables.fresh[:n]
    fill_from = "ann" if fill else None
    rows, tags = merge_channels(lists, quotas, blocked, fill_from)
    names = channel_order(quotas, fill_from)
    reason = np.array([CHANNEL_REASONS.index(f"channel:{names[t]}") for t in range(len(names))], np.int8)
    return rows, reason[tags] if len(tags) else tags
