"""Serving configuration: the `serving:` and `policy:` sections (typed), read from a YAML file, from the
bundle's own recipe (``manifest.json`` carries the training config, other layers' sections included), or
left at their defaults. Environment variables name the bundle and the admin token, so that the CLI and
the Docker image can hand them to ``bentoml serve`` workers.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from features.candidates import CHANNELS
from features.config import ConfigError, apply_overrides, from_dict, load_raw
from serving.policy_config import PolicyConfig, load_policy

ENV_BUNDLE = "FEEDSTACK_BUNDLE"  # bundle directory or models:/<name>@<alias> URI
ENV_CONFIG = "FEEDSTACK_SERVING_CONFIG"  # optional YAML with serving: / policy: sections
ENV_ADMIN_TOKEN = "FEEDSTACK_ADMIN_TOKEN"
ENV_STATE_DIR = "FEEDSTACK_STATE_DIR"  # folder the worker processes share admin state through, across restarts
ENV_BUNDLE_ROOT = "FEEDSTACK_BUNDLE_ROOT"  # the only directory tree /admin/reload may load bundles from
ENV_OVERRIDES = "FEEDSTACK_SERVING_OVERRIDES"  # JSON list of --set dotted.key=value overrides
DEFAULT_BUNDLE = "models:/feedstack@production"
DEFAULT_STATE_DIR = Path("runs") / "serving-state"

# Request limits are part of the API schema (pydantic Field limits), so they are constants, not config.
MAX_K = 200
MAX_ITEM_IDS = 1000
MAX_EXCLUDE = 1000
MAX_ID_LENGTH = 128


@dataclass
class ServingConfig:
    candidates: int = 500  # retrieved from FAISS per request, then ranked
    default_scenario: str = "feed"
    cold_start: Literal["tower", "popular"] = "tower"  # unknown user: user tower on OOV features, or popularity x quality
    onnx_threads: int = 1  # intra-op threads per ONNX session (1 keeps single-request latency predictable)
    faiss_threads: int = 1
    admin_token: str | None = None  # FEEDSTACK_ADMIN_TOKEN wins; no token at all = admin endpoints refuse
    download_dir: str | None = None  # where models:/ bundles are downloaded (default: a temp dir)
    tracking_uri: str | None = None  # MLflow tracking URI for models:/ (default: MLflow's own default)
    fresh_reference: Literal["bundle", "now"] = "bundle"  # "fresh" items are measured from the data's end or now
    hour_from: Literal["now", "bundle"] = "now"  # hour context feature when the request gives none
    # Candidate channels (ann, covisit, trending, fresh, mf) -> items each adds, merged in this order; empty =
    # the quotas the bundle chose on validation (retrieval.json), or the ANN alone for `candidates`.
    channel_quotas: dict[str, int] = field(default_factory=dict)
    # What the channels leave of the quotas' total (co-visitation finds little for a short history, nothing
    # for a new user) is filled from the ANN, so no user gets a short or empty candidate set.
    fill_from_ann: bool = True
    # The MF channel scans the catalogue per request (~0.2 ms at 7.6k items, ~100 ms at 1M on a loaded
    # 2-core machine); above this many items it is off and its quota goes to the ANN.
    mf_channel_max_items: int = 200_000
    exclude_seen: bool = True  # drop items the user was shown (bundle data, request, remembered seen_item_ids)
    seen_window_s: float = 86400.0  # how long a request's seen_item_ids are remembered for the user
    seen_max_users: int = 100_000  # memory bound: least recently active users are forgotten first
    seen_max_items: int = 1000  # per user, newest kept
    # Binary signals the offline policy evaluation scores pages by (besides the fusion-weighted sum); the
    # first is the primary gain of its calibration checks. Empty = the bundle's retrieval positive signal.
    evaluation_gains: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise ConfigError(f"serving.candidates must be >= 1, got {self.candidates}")
        unknown = sorted(set(self.channel_quotas) - set(CHANNELS))
        if unknown:
            raise ConfigError(f"serving.channel_quotas names unknown channels {unknown}; known: {', '.join(CHANNELS)}")
        if any(q < 0 for q in self.channel_quotas.values()):
            raise ConfigError(f"serving.channel_quotas must be >= 0, got {self.channel_quotas}")
        if min(self.seen_window_s, self.seen_max_users, self.seen_max_items, self.mf_channel_max_items) < 0:
            raise ConfigError("serving.seen_window_s, seen_max_users, seen_max_items and mf_channel_max_items must be >= 0")
        if self.onnx_threads < 1 or self.faiss_threads < 1:
            raise ConfigError("serving.onnx_threads and serving.faiss_threads must be >= 1")

    def token(self) -> str | None:
        return os.environ.get(ENV_ADMIN_TOKEN) or self.admin_token


def state_dir() -> Path:
    """FEEDSTACK_STATE_DIR, else runs/serving-state under the working directory (kept across restarts)."""
    return Path(os.environ.get(ENV_STATE_DIR) or DEFAULT_STATE_DIR).resolve()


def bundle_root(source: str) -> Path | None:
    """FEEDSTACK_BUNDLE_ROOT, else the startup bundle's parent directory (None for a models:/ startup)."""
    root = os.environ.get(ENV_BUNDLE_ROOT)
    if root:
        return Path(root).resolve()
    return None if source.startswith("models:/") else Path(source).resolve().parent


@dataclass
class ServeSettings:
    serving: ServingConfig = field(default_factory=ServingConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


def settings_from_raw(raw: dict[str, Any] | None) -> ServeSettings:
    """Build the serving settings from a whole config mapping (other sections are ignored here)."""
    raw = raw or {}
    serving = from_dict(ServingConfig, raw.get("serving") or {}, "serving")
    return ServeSettings(serving, load_policy(raw.get("policy")))


def load_settings(path: str | Path | None, recipe: dict[str, Any] | None = None,
                  overrides: list[str] | None = None) -> ServeSettings:
    """A YAML file wins; else the bundle's recipe (its manifest's training config); else the defaults;
    ``--set`` overrides go on top."""
    if path:
        raw = load_raw(path)
    elif recipe is not None:
        raw = copy.deepcopy(recipe)
    else:
        raw = {}
    return settings_from_raw(apply_overrides(raw, overrides or []))
