"""Load a verified bundle into request-ready arrays: ONNX sessions, the FAISS index and the feature tables
as numpy matrices laid out exactly as ``retrieval.json`` and ``ranking.json`` say.

Nothing here imports torch or ``training``: the two JSON files, read through the typed contract
(:mod:`features.contract`), are the whole recipe for building the towers' and the ranker's input tensors
from a request.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.bundle import BundleError, verify_bundle
from features.candidates import ChannelTables
from features.vocab import HashedLookup, request_lookup
from features.contract import (FANS, FEATURES, ITEMS, MANIFEST, RANKER_ONNX, RANKING, RANKING_JSON, RETRIEVAL,
                               RETRIEVAL_JSON, USERS, VOCAB, Manifest, RankingSpec, RetrievalSpec)
from serving.behaviour import KINDS as BEHAVIOUR_KINDS
from serving.behaviour import BehaviourLookup

DAY_MS = 86_400_000


def resolve_bundle(source: str, download_dir: str | None = None, tracking_uri: str | None = None) -> tuple[Path, str | None]:
    """A local bundle directory for ``source`` (a path, or ``models:/<name>@<alias>`` / ``models:/<name>/<v>``)
    and the registry version when it came from MLflow."""
    if not source.startswith("models:/"):
        return Path(source), None
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    version = None
    try:
        ref = source[len("models:/"):]
        client = mlflow.MlflowClient()
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = str(client.get_model_version_by_alias(name, alias).version)
        elif "/" in ref:
            version = ref.split("/", 1)[1]
    except Exception as e:  # noqa: BLE001 - a missing model or alias is a bundle the caller must refuse
        raise BundleError(f"cannot resolve {source} in the MLflow registry: {e}") from None
    dst = Path(download_dir) if download_dir else Path(tempfile.mkdtemp(prefix="feedstack-bundle-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst)))
    except Exception as e:  # noqa: BLE001
        raise BundleError(f"cannot download {source}: {e}") from None
    if not (local / MANIFEST).exists() and (local / "bundle" / MANIFEST).exists():
        local = local / "bundle"
    return local, version


# --------------------------------------------------------------------------- the loaded bundle


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _id_map(ids: np.ndarray) -> dict[str, int]:
    return {str(v): i for i, v in enumerate(ids)}


@dataclass
class Bundle:
    """Everything a request needs, as arrays. Item rows are items.parquet rows (= FAISS ids)."""

    path: Path
    manifest: Manifest
    version: str
    registry_version: str | None
    retrieval: RetrievalSpec
    ranking: RankingSpec
    user_tower: Any
    ranker: Any  # scores one user's candidates per call
    index: Any
    # catalogue (N items)
    item_ids: np.ndarray  # (N,) str
    item_row: dict[str, int]
    creator_ids: np.ndarray  # (C,) str
    item_creator: np.ndarray  # (N,) creator code
    item_category: np.ndarray  # (N,) category code
    visible: np.ndarray  # (N,) bool
    high_quality: np.ndarray  # (N,) bool, creator flagged high-quality
    upload_ts: np.ndarray  # (N,) float ms, NaN unknown
    popular: np.ndarray  # rows by popularity x quality (cold-start fallback)
    idx_category: np.ndarray  # item_id_idx -> category code, for the user's history
    # users (U)
    history_column: str
    user_row: dict[str, int]
    user_cols: dict[str, np.ndarray]  # column -> (U,) values
    history: np.ndarray  # (U, L) int64
    # fans, CSR by user row: creator codes sorted within a user, values (is_fan, is_iron_fan, interactions)
    fan_ptr: np.ndarray
    fan_creator: np.ndarray
    fan_values: np.ndarray  # (F, 3) float32
    fan_columns: list[str]
    # encoders for request:* sources
    vocab_maps: dict[str, dict[str, int] | HashedLookup]  # request vocabularies (vocab.hash_buckets: hashed)
    # ranker inputs laid out once: positions of each source kind in cat / num
    item_cat: np.ndarray  # (N, #item cat cols)
    item_cat_pos: np.ndarray
    item_num: np.ndarray  # (N, #item num cols)
    item_num_pos: np.ndarray
    user_cat_cols: list[str]
    user_cat_pos: np.ndarray
    user_num_cols: list[str]
    user_num_pos: np.ndarray
    fan_num_pos: np.ndarray
    fan_num_which: np.ndarray  # which fan value feeds each fan position
    request_cat: list[tuple[int, str]]  # (position, vocab name)
    utc_offset_hours: float
    data_end_ms: float
    behaviour: BehaviourLookup | None = None  # pair-keyed behaviour inputs of the ranker
    ranker_file: str = RANKER_ONNX  # which graph ``ranker`` runs: ranking.json's request_onnx when present
    channels: ChannelTables | None = None  # co-visitation, trending, fresh, seen sets (bundles before: None)
    channel_quotas: dict[str, int] | None = None  # the quotas chosen on validation
    page_retrieval_weight: float = 0.0  # the retrieval score's weight in the page's fusion, chosen on validation
    idx_to_row: np.ndarray | None = None  # item_id_idx -> catalogue row (-1 none), for history items
    # The MF channel: the served vectors' MF dimensions [first, end) and the items' side of them, (N, f)
    # (None: the vectors carry no MF dimensions, so the channel is off)
    mf_dims: tuple[int, int] | None = None
    mf_items: np.ndarray | None = None
    # The served item vectors held in memory (an offline as-of view); None: read from the bundle's file on use.
    item_vectors: np.ndarray | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def heads(self) -> list[str]:
        return self.ranking.head_names

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version, "registry_version": self.registry_version, "path": str(self.path),
            "git_revision": self.manifest.git_revision, "dataset": self.manifest.dataset,
            "heads": self.heads, "scenarios": sorted(self.ranking.scenarios), "items": self.n_items,
            "index_ntotal": int(self.index.ntotal), "ranker_graph": f"{RANKING}/{self.ranker_file}",
            "data_notes": self.data_notes(),
        }

    def data_notes(self) -> list[str]:
        """What the bundle's data lacks and how the feed policy falls back (logged when it is loaded)."""
        data = self.manifest.config.get("data", {})
        notes = []
        if "creator_id" not in (data.get("items") or {}).get("columns", {}):
            notes.append("no creators in the data: each item is its own creator, so the creator rules "
                         "(per-creator cap, quality support, exposure fairness, fans-first) act per item")
        if not (self.manifest.config.get("fans") or {}).get("follow_signal"):
            notes.append("no follow signal in the data: nobody is a fan, fans-first serves nothing")
        return notes


def load_bundle(path: str | Path, *, registry_version: str | None = None, onnx_threads: int = 1) -> Bundle:
    """Verify (checksums, format version, components) and load; raises BundleError on any problem."""
    import faiss

    path = Path(path)
    manifest = Manifest.from_json(verify_bundle(path))
    try:
        return _load(path, manifest, registry_version, onnx_threads, faiss)
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - a bundle that verifies but cannot load is still refused
        raise BundleError(f"bundle {path} could not be loaded: {type(e).__name__}: {e}") from e


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _by_source(sources: list[str], allowed: set[str], label: str) -> dict[str, tuple[list[str], list[int]]]:
    """Input positions grouped by source kind: {"items": (columns, positions), ...}, from "kind:name" sources."""
    out: dict[str, tuple[list[str], list[int]]] = {}
    for pos, src in enumerate(sources):
        kind, _, name = src.partition(":")
        if kind not in allowed:
            raise BundleError(f"ranking.json: unknown {label} source '{src}'")
        cols, positions = out.setdefault(kind, ([], []))
        cols.append(name)
        positions.append(pos)
    return out


def _item_arrays(items: pd.DataFrame) -> dict[str, Any]:
    """Per catalogue row: ids, creator codes, category, visibility, quality flag, upload time, and the
    popularity order of the cold-start path; item_id_idx -> category and -> row lookups."""
    n = len(items)
    creator_code, creator_ids = pd.factorize(items["creator_id"].astype(str), sort=False)
    category = items["category_idx"].to_numpy(np.int64) if "category_idx" in items else np.zeros(n, np.int64)
    pop = np.zeros(n)
    for col in ("item_n", "item_quality"):
        if col in items:
            v = items[col].to_numpy(np.float64)
            pop += (v - np.nanmean(v)) / (np.nanstd(v) or 1.0)
    item_idx = items["item_id_idx"].to_numpy(np.int64)
    idx_category = np.zeros(int(item_idx.max(initial=0)) + 1, dtype=np.int64)
    idx_category[item_idx[item_idx > 0]] = category[item_idx > 0]
    idx_to_row = np.full(len(idx_category), -1, np.int64)
    idx_to_row[item_idx[item_idx > 0]] = np.flatnonzero(item_idx > 0)
    item_ids = items["item_id"].astype(str).to_numpy()
    return dict(
        item_ids=item_ids, item_row=_id_map(item_ids), creator_ids=np.asarray(creator_ids, dtype=object).astype(str),
        item_creator=creator_code.astype(np.int64), item_category=category,
        visible=items["visible"].to_numpy(bool) if "visible" in items else np.ones(n, bool),
        high_quality=(items["creator_high_quality"].to_numpy(bool) if "creator_high_quality" in items
                      else np.zeros(n, bool)),
        upload_ts=items["upload_ts"].to_numpy(np.float64) if "upload_ts" in items else np.full(n, np.nan),
        popular=np.argsort(-np.nan_to_num(pop, nan=-1e9), kind="stable"), idx_category=idx_category,
        idx_to_row=idx_to_row,
    )


def _fan_csr(fans: pd.DataFrame, user_ids: np.ndarray, creator_ids: np.ndarray) -> dict[str, Any]:
    """Fan relations as CSR over user rows, creator codes sorted within each user."""
    fan_cols = [c for c in ("is_fan", "is_iron_fan", "fan_interactions") if c in fans.columns]
    fu = pd.Index(user_ids).get_indexer(fans["user_id"].astype(str))
    fc = pd.Index(creator_ids).get_indexer(fans["creator_id"].astype(str))
    ok = (fu >= 0) & (fc >= 0)
    fu, fc = fu[ok], fc[ok]
    vals = fans.loc[ok, fan_cols].to_numpy(np.float32)
    order = np.lexsort((fc, fu))
    fan_ptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.add.at(fan_ptr, fu + 1, 1)
    return dict(fan_ptr=np.cumsum(fan_ptr), fan_creator=fc[order].astype(np.int64), fan_values=vals[order],
                fan_columns=fan_cols)


def _user_arrays(users: pd.DataFrame, spec: dict[str, Any], rspec: RetrievalSpec, kspec: RankingSpec) -> dict[str, Any]:
    """Per user row: the history the towers read and every user column a model reads."""
    hist_col = spec["history"]["column"]
    length = int(spec["history"]["length"])
    h = users[hist_col].to_numpy() if hist_col in users else np.array([])
    history = np.stack(h).astype(np.int64) if len(h) else np.zeros((len(users), length), np.int64)
    if history.shape != (len(users), length):
        raise BundleError(f"users.parquet '{hist_col}' has shape {history.shape}, expected ({len(users)}, {length})")
    needed = {c for t in rspec.user_tower.inputs for c in t.columns if c != hist_col}
    needed |= {s.split(":", 1)[1] for s in kspec.cat.sources + kspec.num.sources if s.startswith("users:")}
    missing = sorted(c for c in needed if c not in users.columns)
    if missing:
        raise BundleError(f"users.parquet lacks columns the models read: {missing}")
    user_ids = users["user_id"].astype(str).to_numpy()
    return dict(history_column=hist_col, history=history, user_cols={c: users[c].to_numpy() for c in needed},
                user_row=_id_map(user_ids))


def _ranker_layout(kspec: RankingSpec, items: pd.DataFrame, vocab_raw: dict, fan_cols: list[str]) -> dict[str, Any]:
    """Which positions of the ranker's cat / num inputs come from the item table, the user, the request
    context and the fan relations (behaviour sources are looked up by serving/behaviour.py)."""
    cat = _by_source(kspec.cat.sources, {"items", "users", "request"}, "categorical")
    num = _by_source(kspec.num.sources, {"items", "users", "fans", *BEHAVIOUR_KINDS}, "numeric")
    for name in cat.get("request", ([], []))[0]:
        if name not in vocab_raw:
            raise BundleError(f"ranking.json source 'request:{name}' names no vocabulary in vocab.json")
    for name in num.get("fans", ([], []))[0]:
        if name not in fan_cols:
            raise BundleError(f"ranking.json source 'fans:{name}': fans.parquet has no column '{name}'")
    empty: tuple[list[str], list[int]] = ([], [])
    (item_cat_cols, item_cat_pos), (user_cat_cols, user_cat_pos) = cat.get("items", empty), cat.get("users", empty)
    (item_num_cols, item_num_pos), (user_num_cols, user_num_pos) = num.get("items", empty), num.get("users", empty)
    fan_names, fan_pos = num.get("fans", empty)
    missing = sorted(c for c in item_cat_cols + item_num_cols if c not in items.columns)
    if missing:
        raise BundleError(f"items.parquet lacks columns the ranker reads: {missing}")
    request_cat = list(zip(*reversed(cat.get("request", empty))))  # [(position, name)]
    return dict(
        item_cat=np.ascontiguousarray(items[item_cat_cols].to_numpy(np.int64)), item_cat_pos=np.array(item_cat_pos, np.int64),
        item_num=np.ascontiguousarray(items[item_num_cols].to_numpy(np.float32)), item_num_pos=np.array(item_num_pos, np.int64),
        user_cat_cols=user_cat_cols, user_cat_pos=np.array(user_cat_pos, np.int64),
        user_num_cols=user_num_cols, user_num_pos=np.array(user_num_pos, np.int64),
        fan_num_pos=np.array(fan_pos, np.int64), fan_num_which=np.array([fan_cols.index(n) for n in fan_names], np.int64),
        request_cat=request_cat,
        vocab_maps={name: request_lookup(name, vocab_raw[name]) for _, name in request_cat},
    )


def _load(path: Path, manifest: Manifest, registry_version: str | None, onnx_threads: int, faiss) -> Bundle:
    fdir = path / FEATURES
    spec = manifest.feature_spec
    rspec = RetrievalSpec.from_json(_read_json(path / RETRIEVAL / RETRIEVAL_JSON))
    kspec = RankingSpec.from_json(_read_json(path / RANKING / RANKING_JSON))
    if not kspec.scenarios:
        raise BundleError(f"{RankingSpec.FILE} defines no fusion scenarios")

    items = pd.read_parquet(fdir / ITEMS)
    users = pd.read_parquet(fdir / USERS)
    fans = pd.read_parquet(fdir / FANS)
    vocab_raw = _read_json(fdir / VOCAB)

    user_tower = _session(path / RETRIEVAL / rspec.files.user_tower, onnx_threads)
    # Serving scores one user's candidates per call: the request graph (same model, the user's side once)
    # when the bundle has one, the general graph otherwise (bundles from before it existed).
    ranker_file = kspec.request_onnx or kspec.onnx
    if not (path / RANKING / ranker_file).is_file():
        raise BundleError(f"{RankingSpec.FILE} names the ranker graph {RANKING}/{ranker_file}, which is missing")
    ranker = _session(path / RANKING / ranker_file, onnx_threads)
    _check_ranker_io(kspec, ranker, ranker_file)
    index = faiss.read_index(str(path / RETRIEVAL / rspec.index.file))
    if index.ntotal != len(items):
        raise BundleError(f"{rspec.index.file} holds {index.ntotal} vectors, {ITEMS} {len(items)} rows: rows must match")
    _apply_search_params(index, rspec.index.search_params, faiss)

    item = _item_arrays(items)
    user = _user_arrays(users, spec, rspec, kspec)
    user_ids = users["user_id"].astype(str).to_numpy()
    fan = _fan_csr(fans, user_ids, item["creator_ids"])
    layout = _ranker_layout(kspec, items, vocab_raw, fan["fan_columns"])
    channels, quotas = _load_channels(path, rspec, len(users), len(items))
    digest = hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()[:12]
    version = f"{registry_version}-{digest}" if registry_version else digest
    behaviour = BehaviourLookup.load(fdir, spec.get("behaviour") or {}, kspec.num.sources, user_ids,
                                     item["creator_ids"], item["item_ids"])
    return Bundle(
        path=path, manifest=manifest, version=version, registry_version=registry_version,
        retrieval=rspec, ranking=kspec, user_tower=user_tower, ranker=ranker, index=index,
        **item, **user, **fan, **layout,
        utc_offset_hours=float((manifest.config.get("data") or {}).get("utc_offset_hours", 0.0)),
        data_end_ms=float(manifest.time_range[1]), ranker_file=ranker_file, behaviour=behaviour,
        channels=channels, channel_quotas=quotas, **_mf_channel(path, rspec, len(items)),
        page_retrieval_weight=float(rspec.page_retrieval_weight or 0.0),
    )


def _mf_channel(path: Path, rspec: RetrievalSpec, n_items: int) -> dict[str, Any]:
    """The MF channel's item factors, sliced once from the served item vectors."""
    mf = rspec.mf
    if mf is None or mf.weight <= 0 or mf.dimensions[1] <= mf.dimensions[0]:
        return {}
    file = path / RETRIEVAL / rspec.files.item_vectors
    if not file.is_file():
        raise BundleError(f"{RetrievalSpec.FILE} has MF dimensions but {RETRIEVAL}/{rspec.files.item_vectors} is missing")
    vectors = np.load(file, mmap_mode="r")
    first, end = (int(d) for d in mf.dimensions)
    if vectors.ndim != 2 or vectors.shape[0] != n_items or vectors.shape[1] < end:
        raise BundleError(f"{RETRIEVAL}/{rspec.files.item_vectors} is {vectors.shape}; the MF dimensions "
                          f"[{first}, {end}) of {n_items} items do not fit")
    return {"mf_dims": (first, end), "mf_items": np.ascontiguousarray(vectors[:, first:end], dtype=np.float32)}


def _load_channels(path: Path, rspec: RetrievalSpec, n_users: int, n_items: int):
    spec = rspec.channels
    if spec is None:
        return None, None
    tables = ChannelTables.load(path / RETRIEVAL / spec.file)
    if tables.seen.shape != (n_users, n_items) or tables.covisit.shape != (n_items, n_items):
        raise BundleError(f"{RETRIEVAL}/{spec.file} covers {tables.seen.shape} users x items, the feature tables "
                          f"({n_users}, {n_items}): rows must match")
    return tables, dict(spec.quotas)


def _apply_search_params(index, params: dict[str, int], faiss) -> None:
    if not params:
        return
    try:
        ps = faiss.ParameterSpace()
        for k, v in params.items():
            ps.set_index_parameter(index, k, v)
    except RuntimeError as e:
        raise BundleError(f"{RetrievalSpec.FILE} index.search_params {params} do not apply to the index: {e}") from None


def _check_ranker_io(spec: RankingSpec, sess, graph: str) -> None:
    """The ranker graph takes exactly the inputs ranking.json names and emits its outputs."""
    names = sorted(i.name for i in sess.get_inputs())
    want = sorted(i.name for i in spec.inputs)
    if names != want:
        raise BundleError(f"{RANKING}/{graph} takes inputs {names}; {RankingSpec.FILE} names {want}")
    outs = {o.name: o.shape for o in sess.get_outputs()}
    missing = [o.name for o in spec.outputs if o is not None and o.name not in outs]
    if missing:
        raise BundleError(f"{RANKING}/{graph} lacks the outputs {missing}; its outputs are {sorted(outs)}")
    shape = outs[spec.scores.name]
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != len(spec.heads)):
        raise BundleError(f"ranker output '{spec.scores.name}' has shape {shape}, {RankingSpec.FILE} lists "
                          f"{len(spec.heads)} heads")
