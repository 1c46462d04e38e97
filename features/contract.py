"""The typed bundle contract: file names, and what ``ranking.json``, ``retrieval.json`` and ``manifest.json``
hold, as dataclasses that training writes (``to_json``) and serving reads (``from_json``).

The dataclasses are the schema: a missing key, an unknown key or a wrong type in the typed part is a
:class:`BundleError` naming the file and the key. What training records only for people (metrics, parity,
calibration, training stats, ...) sits beside the typed keys as ``other``: each class lists those keys in
``OTHER_LAYER_SECTIONS`` and the reader carries them untouched. The JSON keys are the ones documented in the
README; this module only pins them down. No torch and no serving import: both sides use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, ClassVar, Literal, TypeVar

from features.config import ConfigError, from_dict, to_dict

BUNDLE_FORMAT_VERSION = 1
RANKING_FORMAT_VERSION = 1
RETRIEVAL_FORMAT_VERSION = 1

# The bundle's folder under output_dir: the served one (the production refit's when there is one), and
# beside a refit the held-out fit's (not registered; the policy evaluation's held-out periods are in it).
BUNDLE_DIR, HELDOUT_BUNDLE_DIR = "bundle", "heldout-bundle"

# Directories of the bundle, and the files in them.
FEATURES, RETRIEVAL, RANKING = "features", "retrieval", "ranking"
MANIFEST = "manifest.json"  # the bundle's, and the features stage's inside features/
ITEMS, USERS, CREATORS, FANS, VOCAB = "items.parquet", "users.parquet", "creators.parquet", "fans.parquet", "vocab.json"
RETRIEVAL_JSON, RANKING_JSON = "retrieval.json", "ranking.json"
USER_TOWER_ONNX, ITEM_TOWER_ONNX = "user_tower.onnx", "item_tower.onnx"
ITEM_VECTORS, FAISS_INDEX, CHANNELS = "item_vectors.npy", "index.faiss", "channels.npz"
MF_USER_FACTORS = "mf_user_factors.npy"
RANKER_ONNX, RANKER_REQUEST_ONNX = "ranker.onnx", "ranker_request.onnx"


def bundle_path(directory: str, name: str) -> str:
    """A file's path relative to the bundle root, as the manifest lists it."""
    return PurePosixPath(directory, name).as_posix()


class BundleError(ValueError):
    """A bundle that must not be loaded; the message says which file or field is wrong."""


J = TypeVar("J", bound="_Json")


class _Json:
    FILE: ClassVar[str]  # where the JSON lives in the bundle, for messages
    FORMAT_VERSION: ClassVar[int | None] = None

    @classmethod
    def from_json(cls: type[J], data: Any) -> J:
        try:
            spec = from_dict(cls, data, label="bundle")
        except ConfigError as e:
            raise BundleError(f"{cls.FILE}: {e}") from None
        version = getattr(spec, "format_version", None)
        if cls.FORMAT_VERSION is not None and version != cls.FORMAT_VERSION:
            raise BundleError(f"{cls.FILE}: format_version {version!r}, this code reads {cls.FORMAT_VERSION}")
        return spec

    def to_json(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------- ranking/ranking.json


@dataclass
class CatInput:
    name: str
    dtype: str
    shape: list[str | int]  # ["batch", k]
    columns: list[str]
    vocabs: list[str]
    sources: list[str]  # "request:<vocab>", "users:<col>", "items:<col>"
    oov: int


@dataclass
class HistInput:
    name: str
    dtype: str
    shape: list[str | int]  # ["batch", L]
    column: str
    vocab: str
    padding: int
    source: str


@dataclass
class NumInput:
    name: str
    dtype: str
    shape: list[str | int]  # ["batch", n]
    columns: list[str]
    # "items:<col>", "users:<col>", "fans:<col>", and the behaviour tables' "user_creator:<col>",
    # "item_ctx:<ctx>:<col>", "creator_ctx:<ctx>:<col>"
    sources: list[str]
    missing: str
    log1p: list[str]


@dataclass
class ScoresOutput:
    name: str
    dtype: str
    shape: list[str | int]  # ["batch", heads]
    columns: list[str]
    meaning: str


@dataclass
class WatchTimeOutput:
    name: str
    dtype: str
    shape: list[str | int]  # ["batch"]
    unit: str


@dataclass
class Head:
    name: str
    kind: Literal["binary", "watch_time"]
    index: int
    loss_weight: float
    train_positives: int | None  # None for the watch-time head


@dataclass
class RankingSpec(_Json):
    """``ranking/ranking.json``: the ranker graphs, how to build their three inputs, their outputs, heads and
    fusion scenarios."""

    FILE: ClassVar[str] = bundle_path(RANKING, RANKING_JSON)
    FORMAT_VERSION: ClassVar[int | None] = RANKING_FORMAT_VERSION
    OTHER_LAYER_SECTIONS: ClassVar[frozenset[str]] = frozenset({
        "request_constant", "request_parity_max_scaled_diff", "architecture", "fusion", "watch_time", "layout",
        "model", "parity_max_abs_diff", "parity_max_scaled_diff", "parity_per_output", "calibration", "hybrid",
        "single_task", "single_task_parity_max_scaled_diff", "training", "refit",
    })

    format_version: int
    onnx: str
    opset: int
    inputs: tuple[CatInput, HistInput, NumInput]
    outputs: tuple[ScoresOutput, WatchTimeOutput | None]  # watch time only with a watch-time head
    heads: list[Head]
    scenarios: dict[str, dict[str, float]]  # scenario -> head -> weight
    # The graph serving runs: the same model with one request's shared columns computed once (bundles
    # from before it existed have none and serve ``onnx``).
    request_onnx: str | None = None
    other: dict[str, Any] = field(default_factory=dict)

    @property
    def cat(self) -> CatInput:
        return self.inputs[0]

    @property
    def hist(self) -> HistInput:
        return self.inputs[1]

    @property
    def num(self) -> NumInput:
        return self.inputs[2]

    @property
    def scores(self) -> ScoresOutput:
        return self.outputs[0]

    @property
    def watch_time(self) -> WatchTimeOutput | None:
        return self.outputs[1] if len(self.outputs) > 1 else None

    @property
    def head_names(self) -> list[str]:
        return [h.name for h in self.heads]


# --------------------------------------------------------------------------- retrieval/retrieval.json


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[str | int]


@dataclass
class TowerInput:
    name: str
    dtype: str
    shape: list[str | int]
    columns: list[str]
    source: str


@dataclass
class CatTowerInput(TowerInput):
    vocab_sizes: list[int]


@dataclass
class Tower:
    inputs: tuple[CatTowerInput, TowerInput]  # user: user_cat, history; item: item_cat, item_num
    output: TensorSpec


@dataclass
class RetrievalFiles:
    user_tower: str
    item_tower: str
    item_vectors: str
    index: str
    channels: str | None = None  # bundles before the channels: none


@dataclass
class Covisit:
    window: int
    top: int
    signal: str


@dataclass
class Channels:
    file: str
    quotas: dict[str, int]  # chosen on validation
    order: list[str]
    covisit: Covisit
    trending_days: float
    seen: str
    rows: str
    # How the quotas were chosen: training's Recall@K of the merged set on validation, or, after
    # `python -m evaluation choose-channels`, the served page on validation (the evidence is in the
    # manifest's metrics, retrieval.channels.page_choice). Bundles from before this field: None.
    chosen_by: str | None = None


@dataclass
class ItemVectors:
    file: str
    dtype: str
    shape: list[int]  # (items, embedding_dim)
    row_order: str
    features: str
    item_ids: list[str]


@dataclass
class IndexSpec:
    OTHER_LAYER_SECTIONS: ClassVar[frozenset[str]] = frozenset(
        {"rows", "recall@*_vs_exact", "recall_queries", "recall_query_source"})

    file: str
    factory: str
    metric: str
    ntotal: int
    search_params: dict[str, int]  # FAISS ParameterSpace names, e.g. efSearch
    other: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prior:
    beta: float
    dimension: int
    days: float
    user_side: str
    item_side: str


@dataclass
class MatrixFactors:
    weight: float
    dimensions: list[int]  # [first, end) of the MF dimensions in the served vectors
    user_side: str
    item_side: str
    fit_on: str
    user_factors_file: str | None = None  # None without MF dimensions (and in bundles from before it)


@dataclass
class RetrievalSpec(_Json):
    """``retrieval/retrieval.json``: the towers' inputs and outputs, the served item vectors, the FAISS index,
    the retrieval channels and the extra dimensions (popularity prior, MF factors) of the vectors."""

    FILE: ClassVar[str] = bundle_path(RETRIEVAL, RETRIEVAL_JSON)
    FORMAT_VERSION: ClassVar[int | None] = RETRIEVAL_FORMAT_VERSION
    OTHER_LAYER_SECTIONS: ClassVar[frozenset[str]] = frozenset({
        "similarity", "temperature", "positive_signal", "baselines", "parity", "config", "training", "metrics",
        "refit",
    })

    format_version: int
    embedding_dim: int
    opset: int
    user_tower: Tower
    item_tower: Tower
    files: RetrievalFiles
    item_vectors: ItemVectors
    index: IndexSpec
    prior: Prior
    mf: MatrixFactors | None = None  # bundles from before the MF dimensions: none
    channels: Channels | None = None  # bundles from before the channels: none
    # Weight of the candidate's retrieval score (user vector . item vector) in the page's fusion, chosen on
    # the validation page by `python -m evaluation choose-channels`; serving uses it unless
    # policy.fusion.retrieval_weight is set. None: never chosen (0, the ranker alone orders the page).
    page_retrieval_weight: float | None = None
    other: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- manifest.json


@dataclass
class BundleInfo(_Json):
    """The recipe part of ``manifest.json``, as training assembles it."""

    FILE: ClassVar[str] = MANIFEST

    dataset: str
    time_range: list[int]  # [first, last] event time, epoch ms
    split: dict[str, str]  # ISO start, valid_start, test_start, end
    schema_hash: str
    feature_spec: dict[str, Any]  # the features stage's spec, as in features/manifest.json
    heads: list[Head] | None
    index_factory: str | None
    refit: bool
    metrics: dict[str, Any]
    config: dict[str, Any]  # the whole training config, other layers' sections included
    git_revision: str


@dataclass
class Manifest(BundleInfo):
    """``manifest.json`` as :func:`features.bundle.write_manifest` completes it (its checks live in
    :func:`features.bundle.verify_bundle`)."""

    FORMAT_VERSION: ClassVar[int | None] = BUNDLE_FORMAT_VERSION

    format_version: int
    components: list[str]
    files: dict[str, str]  # relative path -> sha256
