"""The bundle: the only contract between training and serving.

A directory::

    manifest.json          format version, dataset and time range, heads, feature spec, metrics,
                           config, git revision, and the sha256 of every other file
    features/              the feature tables serving looks up (manifest.json, items/users/creators/
                           fans .parquet, vocab.json, and interactions.parquet for evaluation)
    retrieval/             user_tower.onnx, item_tower.onnx, item_vectors.npy, index.faiss, channels.npz,
                           retrieval.json
    ranking/               ranker.onnx, ranker_request.onnx, ranking.json (and single_task/*.onnx baselines
                           when exported)

Both sides import this module; it has no torch and no serving dependency. The file names and the typed
content of the JSON files are in :mod:`features.contract`. :func:`verify_bundle` is what a loader calls
first: a bundle that fails it must be refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

from features.contract import (BUNDLE_FORMAT_VERSION, CREATORS, FAISS_INDEX, FANS, FEATURES,
                               ITEM_TOWER_ONNX, ITEM_VECTORS, ITEMS, MANIFEST, RANKER_ONNX, RANKING, RANKING_JSON,
                               RETRIEVAL, RETRIEVAL_JSON, USER_TOWER_ONNX, USERS, VOCAB, BundleError, bundle_path)

# What each component must hold (optional files, e.g. the request graph or the channels, are not listed).
COMPONENTS: dict[str, tuple[str, ...]] = {
    FEATURES: tuple(bundle_path(FEATURES, f) for f in (MANIFEST, ITEMS, USERS, CREATORS, FANS, VOCAB)),
    RETRIEVAL: tuple(bundle_path(RETRIEVAL, f)
                     for f in (USER_TOWER_ONNX, ITEM_TOWER_ONNX, ITEM_VECTORS, FAISS_INDEX, RETRIEVAL_JSON)),
    RANKING: (bundle_path(RANKING, RANKER_ONNX), bundle_path(RANKING, RANKING_JSON)),
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_files(bundle_dir: Path) -> list[str]:
    """Every file of the bundle but its top-level manifest, as sorted relative POSIX paths."""
    top = bundle_dir / MANIFEST
    return sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file() and p != top)


def write_manifest(bundle_dir: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file of the bundle and write ``manifest.json`` (``info`` adds the recipe and metrics)."""
    bundle_dir = Path(bundle_dir)
    components = [c for c, files in COMPONENTS.items() if all((bundle_dir / f).exists() for f in files)]
    manifest = {
        "format_version": BUNDLE_FORMAT_VERSION,
        **info,
        "components": components,
        "files": {rel: sha256_file(bundle_dir / rel) for rel in bundle_files(bundle_dir)},
    }
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def verify_bundle(bundle_dir: str | Path, require: Iterable[str] = ("features", "retrieval", "ranking")) -> dict[str, Any]:
    """Return the manifest of a sound bundle; raise BundleError naming the first problem otherwise."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory not found: {bundle_dir}")
    if not path.exists():
        raise BundleError(f"{bundle_dir} has no {MANIFEST}: not a feedstack bundle")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version!r}, this code reads {BUNDLE_FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path} lists no files")
    for component in require:
        missing = [f for f in COMPONENTS[component] if f not in files]
        if missing:
            raise BundleError(f"bundle {bundle_dir} lacks the {component} component: {missing}")
    for rel, digest in files.items():
        f = bundle_dir / rel
        if not f.is_file():
            raise BundleError(f"bundle file missing: {rel}")
        actual = sha256_file(f)
        if actual != digest:
            raise BundleError(f"checksum mismatch for {rel}: manifest {digest[:12]}..., file {actual[:12]}...")
    return manifest


def amend_channel_quotas(bundle_dir: str | Path, quotas: dict[str, int], chosen_by: str,
                         metrics_update: Callable[[dict[str, Any]], None] | None = None,
                         verified: dict[str, Any] | None = None,
                         retrieval_weight: float | None = None) -> dict[str, Any]:
    """Set the bundle's served channel quotas (``retrieval.json`` channels) and, when given, the page's
    ``retrieval_weight`` (``page_retrieval_weight``), and re-checksum it.

    The bundle must verify first (a damaged one is refused, not re-signed); ``verified`` is the manifest
    :func:`verify_bundle` just returned for it, when the caller checked it already. ``metrics_update`` edits
    the manifest's metrics in place (the evidence for the choice). The amended bundle is built beside the old
    one from hard links plus the two rewritten JSON files and swapped in with one rename, so a reader sees
    the old bundle or the new one, never a half-written one. Only the rewritten file is hashed again (the
    links hold the verified bytes). Returns the new manifest."""
    from features.candidates import CHANNELS as CHANNEL_NAMES
    from features.contract import Manifest, RetrievalSpec

    bundle_dir = Path(bundle_dir)
    manifest = verified if verified is not None else verify_bundle(bundle_dir)
    rel = bundle_path(RETRIEVAL, RETRIEVAL_JSON)
    spec = RetrievalSpec.from_json(json.loads((bundle_dir / rel).read_text()))
    if spec.channels is None:
        raise BundleError(f"{bundle_dir / rel} has no channels section: this bundle serves the ANN alone")
    unknown = sorted(set(quotas) - set(CHANNEL_NAMES))
    if unknown or not quotas or any(int(q) < 0 for q in quotas.values()) or sum(quotas.values()) <= 0:
        raise BundleError(f"channel quotas must name known channels ({', '.join(CHANNEL_NAMES)}) with counts >= 0 "
                          f"and a positive total, got {quotas}")
    spec.channels.quotas = {c: int(q) for c, q in quotas.items()}
    spec.channels.order = list(quotas)
    spec.channels.chosen_by = chosen_by
    if retrieval_weight is not None:
        if not math.isfinite(retrieval_weight) or retrieval_weight < 0:
            raise BundleError(f"the page's retrieval weight must be a finite number >= 0, got {retrieval_weight}")
        spec.page_retrieval_weight = float(retrieval_weight)
    info = Manifest.from_json(manifest)
    if metrics_update is not None:
        metrics_update(info.metrics)

    tmp, old = bundle_dir.with_name(bundle_dir.name + ".amend"), bundle_dir.with_name(bundle_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle_dir, tmp, copy_function=_link_or_copy)
    target = tmp / rel
    target.unlink()  # a hard link: writing through it would change the live bundle's file
    target.write_text(json.dumps(spec.to_json(), indent=2))
    (tmp / MANIFEST).unlink()
    new = info.to_json()
    new["files"] = {**new["files"], rel: sha256_file(target)}
    (tmp / MANIFEST).write_text(json.dumps(new, indent=2, default=str))
    shutil.rmtree(old, ignore_errors=True)
    bundle_dir.rename(old)
    tmp.rename(bundle_dir)
    shutil.rmtree(old, ignore_errors=True)
    return new


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)
