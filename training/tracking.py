"""MLflow tracking with a local default: a SQLite store and artifact folder under ``runs/``.

``MLFLOW_TRACKING_URI`` overrides the store (e.g. an MLflow server). Every artifact of one training run
hangs off one MLflow run; the dataset manifest is logged with it so a model can be traced to its data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
from pathlib import Path
from typing import Any, Iterator, Sequence

DEFAULT_STORE = Path("runs")
RUN_MARKER = ".mlflow_run"  # in a fit's output_dir while its MLflow run is open: "<run id> <pid> <host>"
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


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's fit: not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_interrupted_run(run_dir: Path) -> str | None:
    """A fit killed in ``run_dir`` (kill -9, OOM) left its MLflow run RUNNING: mark it KILLED, return its id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    marker = run_dir / RUN_MARKER
    try:
        run_id, pid, host = marker.read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    if int(pid) != os.getpid() and _alive(int(pid), host):
        return None  # a fit still running in the same output_dir
    client = mlflow.MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return None
        client.set_tag(run_id, "feedstack.end", "killed; closed by the next fit in the same output_dir")
        client.set_terminated(run_id, status="KILLED")
    except MlflowException:
        return None
    return run_id


@contextlib.contextmanager
def _sigterm_fails_run() -> Iterator[None]:
    """SIGTERM ends the fit through an exception, so MLflow closes the run (FAILED) instead of leaving it open."""

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def mlflow_run(run_name: str, config: dict[str, Any], features_manifest: dict[str, Any] | None = None,
               tags: dict[str, str] | None = None, run_dir: Path | None = None, resume: bool = False) -> Iterator[Any]:
    """Start (or nest into) an MLflow run with the resolved config as params and the data manifest.
    ``run_dir``: the fit's output_dir; a run a killed fit left open there is marked KILLED and linked."""
    import mlflow

    setup_mlflow()
    nested = mlflow.active_run() is not None
    killed = close_interrupted_run(run_dir) if run_dir is not None and not nested else None
    with _sigterm_fails_run(), mlflow.start_run(run_name=run_name, nested=nested) as run:
        if run_dir is not None and not nested:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RUN_MARKER).write_text(f"{run.info.run_id} {os.getpid()} {socket.gethostname()}")
        if killed is not None:
            mlflow.set_tag("feedstack.resumed_from" if resume else "feedstack.after_killed_run", killed)
            mlflow.MlflowClient().set_tag(killed, "feedstack.continued_by", run.info.run_id)
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
    if run_dir is not None and not nested:
        (run_dir / RUN_MARKER).unlink(missing_ok=True)


# --------------------------------------------------------------------------- what both stages log into the run


def active_run_logger() -> Any:
    """A Lightning logger writing into the MLflow run the CLI opened, or None without one. It leaves ending
    the run to the CLI (the stock logger marks the run finished when training ends)."""
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    run = mlflow.active_run()
    if run is None:
        return None

    class ActiveRunLogger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:  # noqa: ARG002
            return None

    return ActiveRunLogger(run_id=run.info.run_id, tracking_uri=mlflow.get_tracking_uri())


def metric_key(*parts: str) -> str:
    """MLflow metric names may not hold '@': recall@100 -> recall_at_100."""
    return "/".join(parts).replace("@", "_at_")


def metric_tree(report: dict[str, Any], prefix: str) -> dict[str, float]:
    """Every number in a nested report, keyed by its '/'-joined path under ``prefix`` (log_to_run drops
    the non-finite ones)."""
    flat: dict[str, float] = {}
    for k, v in report.items():
        key = metric_key(prefix, str(k))
        if isinstance(v, dict):
            flat.update(metric_tree(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[key] = float(v)
    return flat


def log_to_run(metrics: dict[str, float], files: Sequence[Path] = (), artifact_path: str | None = None,
               tags: dict[str, Any] | None = None) -> None:
    """Finite metrics, tags and files into the active MLflow run; nothing without one."""
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if math.isfinite(float(v))})
    if tags:
        mlflow.set_tags(tags)  # tags, not params: a resumed fit may log them again with other values
    for f in files:
        if Path(f).is_file():
            mlflow.log_artifact(str(f), artifact_path=artifact_path)
