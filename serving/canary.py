"""Reload as a canary swap: a bundle that loads is not yet a bundle that answers.

Checksums prove the files are the ones the manifest lists, not that they are the right files: an item tower
saved as the user tower, or an empty ``item_vectors.npy``, verify and load, then fail every request. So a
new bundle first answers probe requests (a known user, a cold user, ``/rank``) through a throwaway
:class:`Recommender` in this process; only then is it swapped in. The same probe, cheaper, backs
``/readyz``. Reload sources are limited to registry URIs and directories under a bundle root, and error
texts carry no absolute paths.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np

from features.bundle import BundleError
from serving.bundle import Bundle
from serving.config import ServeSettings
from serving.recommender import Recommender
from serving.results import RequestError, Result

COLD_USER = "__feedstack_probe_cold_user__"
PROBE_K = 5
_ABS_PATH = re.compile(r"(?<![\w.:>])/(?:[^\s/'\"():,]+/)+([^\s/'\"():,]*)")


def known_user(bundle: Bundle) -> str | None:
    """A user with history (the probe's warm path), or None when the bundle has no users."""
    if not len(bundle.history):
        return None
    rows = np.flatnonzero((bundle.history > 0).any(axis=1))
    row = int(rows[0]) if len(rows) else 0
    ids = [u for u, r in bundle.user_row.items() if r == row][:1]
    return ids[0] if ids else None


def _check_vectors(bundle: Bundle) -> None:
    path = bundle.path / "retrieval" / "item_vectors.npy"
    if not path.exists():
        return
    try:
        vecs = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise BundleError(f"retrieval/item_vectors.npy cannot be read: {e}") from None
    want = (bundle.n_items, int(bundle.index.d))
    if vecs.shape != want:
        raise BundleError(f"retrieval/item_vectors.npy has shape {vecs.shape}, expected {want} (items x index dim)")


def _check(result: Result, what: str, allow_empty: bool = False) -> None:
    if not result.items and not allow_empty:
        raise BundleError(f"probe {what} answered no items")
    for item in result.items:
        values = [item.score, *item.predictions.values()]
        if not all(math.isfinite(v) for v in values):
            raise BundleError(f"probe {what} answered a non-finite score for item {item.item_id}")


def probe(rec: Recommender, full: bool = True, user: str | None = None) -> None:
    """Raise BundleError unless ``rec`` answers like a working service. ``full``: /recommend for a known and
    a cold user and /rank (a canary's own tracker records those pages); else retrieval and /rank only,
    which leave the live service's state untouched."""
    b = rec.bundle
    if b.n_items == 0:
        raise BundleError("the bundle's catalogue is empty")
    user = user or known_user(b)
    try:
        if full:
            _check_vectors(b)
            for who in ([user] if user else []) + [COLD_USER]:
                _check(rec.recommend(who, PROBE_K), f"/recommend for {'a cold' if who == COLD_USER else 'a known'} user")
        elif not len(rec.retrieve(user or COLD_USER, PROBE_K)):
            raise BundleError("probe retrieval found no items")
        items = [str(i) for i in b.item_ids[np.flatnonzero(b.visible)[:PROBE_K]]]
        _check(rec.rank(user or COLD_USER, items), "/rank", allow_empty=not items)
    except BundleError:
        raise
    except (RequestError, Exception) as e:  # noqa: BLE001 - whatever breaks a probe refuses the bundle
        raise BundleError(f"probe request failed: {type(e).__name__}: {str(e)[:300]}") from None


def canary(bundle: Bundle, settings: ServeSettings) -> None:
    """Probe ``bundle`` on a throwaway recommender (its own in-memory exposure tracker)."""
    probe(Recommender(bundle, settings), full=True)


class Health:
    """``/readyz``: the live recommender answers a cheap probe; the verdict is kept for ``ttl`` seconds."""

    def __init__(self, ttl: float = 1.0):
        self.ttl = ttl
        self._at = -math.inf
        self._ok = False
        self._user: tuple[Bundle, str | None] | None = None  # the probe user, found once per bundle
        self.error: str | None = None

    def ready(self, rec: Recommender | None) -> bool:
        if rec is None:
            return False
        now = time.monotonic()
        if now - self._at > self.ttl:
            b = rec.bundle
            if self._user is None or self._user[0] is not b:
                self._user = (b, known_user(b))
            try:
                probe(rec, full=False, user=self._user[1])
                self._ok, self.error = True, None
            except BundleError as e:
                self._ok, self.error = False, str(e)
            self._at = now
        return self._ok

    def reset(self) -> None:
        self._at = -math.inf


# --------------------------------------------------------------------------- where reloads may come from


def reload_path(source: str, root: Path | None) -> str:
    """``source`` as the loader takes it: a registry URI as is, a path only inside ``root`` (relative
    paths are relative to it). The refusal is the same whether or not the path exists."""
    if source.startswith("models:/"):
        return source
    refusal = RequestError("bundle", "bundle: give a models:/ URI or a directory under the service's bundle root"
                           + ("" if root is not None else " (none is configured: set FEEDSTACK_BUNDLE_ROOT)"))
    if root is None or "\x00" in source:
        raise refusal
    base = root.resolve()
    target = (base / source).resolve()  # an absolute source stays absolute; '..' and links are resolved
    if target != base and base not in target.parents:
        raise refusal
    return str(target)


def public(message: str, root: Path | None = None) -> str:
    """An error text for clients: the bundle root as ``<bundle root>``, any other absolute path by its name."""
    if root is not None:
        message = message.replace(str(root.resolve()), "<bundle root>")
    return _ABS_PATH.sub(lambda m: m.group(1) or "<path>", message)
