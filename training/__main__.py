"""feedstack training CLI.

    python -m training fit --config configs/kuairand.yaml [--stage all|retrieval|ranking] [--resume] [--set k=v]
    python -m training evaluate --bundle runs/kuairand/bundle --log LATER.csv --out metrics.json
    python -m training evaluate-policy --bundle runs/full/heldout-bundle [--log LATER.csv] --out policy.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from features.build import build_features
from features.cli_common import add_config_args, run_cli
from features.config import apply_overrides, from_dict, load_config, to_dict
from features.contract import HELDOUT_BUNDLE_DIR
from training.config import TrainConfig
from training.report import format_metrics

STAGES = ("retrieval", "ranking")


def _fit(args: argparse.Namespace) -> int:
    from features.tables import FeatureTables
    from training.bundle import assemble_bundle, log_and_register
    from training.tracking import mlflow_run, setup_mlflow
    from training.trainer import barrier, is_global_zero, join_external_launch

    cfg = load_config(args.config, args.overrides, TrainConfig)
    _quiet_lightning()
    stages = STAGES if args.stage == "all" else (args.stage,)
    join_external_launch(cfg.trainer)
    if not is_global_zero(cfg.trainer):
        return _fit_worker(cfg, args, stages)
    t0 = time.perf_counter()
    built = build_features(cfg, progress=not args.no_progress)
    barrier()  # torchrun: the other ranks wait for these features (see _fit_worker)
    print(f"features: {'up to date' if built.skipped else 'built'} in {built.out_dir}")
    tables = FeatureTables.load(built.out_dir)
    out = Path(cfg.output_dir)
    metrics_path = out / "metrics.json"
    metrics: dict[str, Any] = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics["data"] = {
        "log": str(Path(cfg.data.dir) / cfg.data.interactions.file),
        "rows": built.manifest["rows"],
        "entities": built.manifest["entities"],
        "split": built.manifest["split"]["iso"],
    }
    setup_mlflow(cfg.tracking.experiment)
    with mlflow_run(f"fit-{args.stage}", to_dict(cfg), built.manifest, run_dir=out, resume=args.resume) as run:
        import mlflow

        for stage in stages:
            metrics[stage] = _fit_stage(stage, cfg, tables, args.resume, progress=not args.no_progress)
            # Each stage's results land as soon as it ends: a later stage that fails loses nothing.
            metrics.pop("refit", None)  # a refit's record belongs to the held-out fit it followed
            metrics_path.write_text(json.dumps(metrics, indent=2))
            mlflow.log_dict(metrics, "metrics.json")
        print(format_metrics(metrics))
        source = None
        if cfg.training.refit and args.stage == "all":
            from training.refit import run_refit

            print("refit: training both stages on every day with the chosen epochs and calibration")
            source = run_refit(cfg, metrics, progress=not args.no_progress)
            metrics_path.write_text(json.dumps(metrics, indent=2))
            print(f"refit: {metrics['refit']['rows']} rows, retrieval {metrics['refit']['retrieval']['training']['epochs']} "
                  f"epochs, ranking {metrics['refit']['ranking']['training']['epochs']} epochs -> {source}")
        elif cfg.training.refit:
            print("refit: skipped (it follows a fit of both stages: --stage all)")
        mlflow.log_dict(metrics, "metrics.json")
        if all((out / s).is_dir() for s in STAGES):
            bundle = assemble_bundle(cfg, metrics, source)
            reg = log_and_register(cfg, bundle, metrics)
            print(f"bundle: {bundle}")
            print("  (next: `python -m evaluation choose-channels` with this config chooses the page's retrieval "
                  "weight and the channel quotas by the page on validation)")
            if source is not None:  # the refit saw every day: the policy evaluation needs the held-out models
                heldout = assemble_bundle(cfg, metrics, None, name=HELDOUT_BUNDLE_DIR)
                print(f"held-out bundle (evaluate-policy on the valid / test periods): {heldout}")
            if reg.version is not None:
                failed = [k for k, g in reg.gates.items() if not g["passed"]]
                alias = (f"alias '{cfg.tracking.alias}' -> version {reg.version}" if reg.alias_moved
                         else f"alias not moved, failed gates: {failed}")
                print(f"registered '{cfg.tracking.registered_model}' version {reg.version}; {alias}")
        else:
            print("bundle: not assembled yet (needs both the retrieval and the ranking stage outputs)")
        print(f"mlflow run {run.info.run_id}; done in {time.perf_counter() - t0:.1f} s")
    return 0


def _fit_stage(stage: str, cfg: TrainConfig, tables: Any, resume: bool, progress: bool) -> dict[str, Any]:
    """Fit one stage into ``<output_dir>/<stage>``; its metrics (on ranks other than 0: what the stage returns)."""
    if stage == "retrieval":
        from training.retrieval.pipeline import fit_retrieval

        return fit_retrieval(cfg, tables, Path(cfg.output_dir) / stage, resume=resume, progress=progress)
    from training.ranking.pipeline import fit_ranking

    return fit_ranking(cfg, tables, Path(cfg.output_dir) / stage, resume=resume, progress=progress)


def _fit_worker(cfg: TrainConfig, args: argparse.Namespace, stages: tuple[str, ...]) -> int:
    """A rank other than 0 of a distributed fit (``trainer.strategy: ddp``): it joins every distributed fit
    in the order rank 0 runs them and leaves features, evaluation, export, the bundle and MLflow to rank 0."""
    from features.tables import FeatureTables
    from training.trainer import barrier

    barrier()  # torchrun: rank 0 builds the features first (Lightning's launch starts us after that)
    tables = FeatureTables.load(cfg.features_dir)
    for stage in stages:
        _fit_stage(stage, cfg, tables, args.resume, progress=False)
    if cfg.training.refit and args.stage == "all":
        from training.refit import run_refit

        run_refit(cfg, {}, progress=False)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from features.bundle import verify_bundle
    from features.external import read_later_log
    from features.tables import FeatureTables

    bundle = Path(args.bundle)
    manifest = verify_bundle(bundle, require=("features",))
    if args.config:
        cfg = load_config(args.config, args.overrides, TrainConfig)
    else:  # the recipe travels with the bundle: parse the log with the dataset config it was trained on
        cfg = from_dict(TrainConfig, apply_overrides(manifest["config"], args.overrides))
        cfg.validate()
    tables = FeatureTables.load(bundle / "features")
    rows, report = read_later_log(cfg, args.log, tables)
    if report.get("warning"):
        print(f"warning: {report['warning']}", file=sys.stderr)
    metrics: dict[str, Any] = {"data": report, "bundle": {"path": str(bundle), "git_revision": manifest.get("git_revision")}}
    if "retrieval" in manifest["components"]:
        from training.retrieval.evaluate import evaluate_retrieval

        metrics["retrieval"] = evaluate_retrieval(bundle, rows, tables, cfg)
    if "ranking" in manifest["components"]:
        from training.ranking.evaluate import evaluate_ranking

        metrics["ranking"] = evaluate_ranking(bundle, rows, tables, cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    print(format_metrics(metrics))
    print(f"wrote {out}")
    return 0


def _quiet_lightning() -> None:
    """Lightning's per-Trainer banners ("GPU available", tips) and a deprecation warning from its own
    pytree helper would repeat for every model we fit. Lightning sets its loggers' level when it is
    imported, so this runs after the import."""
    import warnings

    import lightning.pytorch  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*`validation_step` but have no `val_dataloader`")  # the refit


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m training", description="feedstack training and evaluation")
    sub = ap.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="build features, train, evaluate, export, index, bundle, register")
    add_config_args(fit)
    fit.add_argument("--stage", choices=("all", *STAGES), default="all")
    fit.add_argument("--resume", action="store_true", help="continue from the last checkpoint of each stage")
    fit.add_argument("--no-progress", action="store_true")
    ev = sub.add_parser("evaluate", help="evaluate a bundle on any later log")
    ev.add_argument("--bundle", required=True, help="bundle directory")
    ev.add_argument("--log", required=True, help="log file in the dataset's raw layout (CSV or Parquet)")
    ev.add_argument("--out", default="metrics.json", help="where to write the metrics JSON")
    ev.add_argument("--config", default=None, help="dataset config for the log (default: the bundle's own)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    # The policy evaluation runs serving's own code, so it lives above both layers (evaluation/); this
    # subcommand forwards there so that scripts written against it keep working.
    sub.add_parser("evaluate-policy", add_help=False,
                   help="feed policy vs engagement-only, offline (= python -m evaluation policy ...)")
    if len(sys.argv) > 1 and sys.argv[1] == "evaluate-policy":
        import subprocess

        return subprocess.call([sys.executable, "-m", "evaluation", "policy", *sys.argv[2:]])
    args = ap.parse_args()
    return _fit(args) if args.command == "fit" else _evaluate(args)


if __name__ == "__main__":
    run_cli(main)
