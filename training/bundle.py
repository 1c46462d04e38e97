"""Assemble the bundle from a run's outputs, log it to MLflow, register a version, move the alias on gates."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.bundle import COMPONENTS, write_manifest
from features.contract import (BUNDLE_DIR, FEATURES, MANIFEST, RANKING, RANKING_JSON, RETRIEVAL, RETRIEVAL_JSON, BundleInfo,
                               RankingSpec, RetrievalSpec)
from features.config import to_dict
from training.config import TrainConfig

# Files of a stage directory that are working state, not part of what serving loads.
_SKIP = ("checkpoints", "quarantine_", "lightning_logs")


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _copy_stage(src: Path, dst: Path) -> None:
    def ignore(_dir: str, names: list[str]) -> list[str]:
        return [n for n in names if n.startswith(_SKIP)]

    shutil.copytree(src, dst, ignore=ignore)


def metric_at(metrics: dict[str, Any], dotted: str) -> float | None:
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) else None


def check_gates(metrics: dict[str, Any], gates: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each gate: the metric found (or None), its minimum, and whether it passed."""
    out = {}
    for path, minimum in gates.items():
        value = metric_at(metrics, path)
        out[path] = {"value": value, "min": minimum, "passed": value is not None and value >= minimum}
    return out


def assemble_bundle(cfg: TrainConfig, metrics: dict[str, Any], source: Path | None = None, name: str = BUNDLE_DIR) -> Path:
    """Copy features, retrieval and ranking outputs of ``source`` (default ``<output_dir>``; the production
    refit's folder when there is one) into ``<output_dir>/<name>`` and write its manifest."""
    out = Path(cfg.output_dir)
    source = Path(source) if source is not None else out
    bundle = out / name
    tmp = out / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for component in COMPONENTS:
        src = source / component
        if src.is_dir():
            _copy_stage(src, tmp / component)
    features_manifest = json.loads((tmp / FEATURES / MANIFEST).read_text())
    ranking_json = tmp / RANKING / RANKING_JSON
    retrieval_json = tmp / RETRIEVAL / RETRIEVAL_JSON
    ranking = RankingSpec.from_json(json.loads(ranking_json.read_text())) if ranking_json.exists() else None
    retrieval = RetrievalSpec.from_json(json.loads(retrieval_json.read_text())) if retrieval_json.exists() else None
    info = BundleInfo(
        dataset=features_manifest["dataset"],
        time_range=[features_manifest["split"]["start"], features_manifest["split"]["end"]],
        split=features_manifest["split"]["iso"],
        schema_hash=features_manifest["schema_hash"],
        feature_spec=features_manifest["feature_spec"],
        heads=ranking.heads if ranking else None,
        index_factory=retrieval.index.factory if retrieval else None,
        refit=source != out,
        metrics=metrics,
        config=to_dict(cfg),
        git_revision=git_revision(),
    )
    write_manifest(tmp, info.to_json())
    # Swap in the finished bundle in one rename so a reader never sees a half-written one.
    old = out / f"{name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if bundle.exists():
        bundle.rename(old)
    tmp.rename(bundle)
    shutil.rmtree(old, ignore_errors=True)
    return bundle


@dataclass
class Registration:
    version: str | None
    alias_moved: bool
    gates: dict[str, dict[str, Any]]
    source: str | None


def log_and_register(cfg: TrainConfig, bundle: Path, metrics: dict[str, Any]) -> Registration:
    """Log the bundle as artifacts of the active run; register a version; move the alias only on passing gates."""
    import mlflow

    mlflow.log_artifacts(str(bundle), "bundle")
    gates = check_gates(metrics, cfg.tracking.gates)
    if not cfg.tracking.register:
        return Registration(None, False, gates, None)
    client = mlflow.MlflowClient()
    name = cfg.tracking.registered_model
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="feedstack bundle: ONNX towers, ranker, FAISS index, feature tables")
    run = mlflow.active_run()
    source = mlflow.get_artifact_uri("bundle")
    passed = all(g["passed"] for g in gates.values())
    mv = client.create_model_version(
        name, source=source, run_id=run.info.run_id if run else None,
        tags={"gates": "passed" if passed else "failed", "gate_results": json.dumps(gates)[:4000]},
    )
    if passed:
        client.set_registered_model_alias(name, cfg.tracking.alias, mv.version)
    mlflow.set_tags({"registered_version": mv.version, "alias_moved": str(passed)})
    return Registration(str(mv.version), passed, gates, source)
