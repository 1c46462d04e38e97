"""MLflow tracking with a local default: a SQLite store and artifact folder under ``runs/``.

``MLFLOW_TRACKING_URI`` overrides the store (e.g. an MLflow server). Every artifact of one training run
hangs off one MLflow run; the dataset manifest is logged with it so a model can be traced to its data.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

DEFAULT_STORE = Path("runs")
EXPERIMENT = "feedstack"
REGISTERED_MODEL = "feedstack"


def tracking_uri(store: Path = DEFAULT_STORE) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(store / 'mlflow.db').resolve()}"


def setup_mlflow(experiment: str = EXPERIMENT, store: Path = DEFAULT_STORE) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(store))
    if mlflow.get_experiment_by_name(experiment) is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.create_experiment(experiment, artifact_location=(store / "mlartifacts").resolve().as_uri())
    mlflow.set_experiment(experiment)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


@contextlib.contextmanager
def mlflow_run(run_name: str, config: dict[str, Any], features_manifest: dict[str, Any] | None = None,
               tags: dict[str, str] | None = None) -> Iterator[Any]:
    """Start (or nest into) an MLflow run with the resolved config as params and the data manifest."""
    import mlflow

    setup_mlflow()
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        params = flatten(config)
        # MLflow caps a param value at 6000 chars and a batch at 100 params.
        items = [(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        if features_manifest is not None:
            mlflow.set_tags(
                {
                    "dataset": features_manifest.get("dataset", ""),
                    "features.schema_hash": features_manifest.get("schema_hash", ""),
                    "features.config_hash": features_manifest.get("inputs", {}).get("config_hash", ""),
                }
            )
            mlflow.log_dict(features_manifest, "features_manifest.json")
        if tags:
            mlflow.set_tags(tags)
        yield run
