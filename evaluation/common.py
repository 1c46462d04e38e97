"""What every offline evaluation CLI shares: the bundle / period / later-log arguments and reading a later log
through the bundle's own dataset config."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pandas as pd

from features.cli_common import user_count
from features.config import apply_overrides, from_dict, load_config


def add_common_arguments(ap: argparse.ArgumentParser, out_default: str) -> None:
    ap.add_argument("--bundle", required=True, help="bundle directory (a held-out fit's, for its own periods)")
    ap.add_argument("--log", default=None, help="later log in the dataset's raw layout (default: the bundle's own period)")
    ap.add_argument("--period", choices=("valid", "test"), default="test", help="bundle period when --log is omitted")
    ap.add_argument("--out", default=out_default, help="where to write the metrics JSON")
    ap.add_argument("--policy-config", default=None,
                    help="YAML whose serving: / policy: sections are evaluated (default: the bundle's recipe)")
    ap.add_argument("--config", default=None, help="dataset config for --log (default: the bundle's own)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--scenario", default=None)
    ap.add_argument("--max-users", type=user_count, default=None,
                    help="the first N evaluated users (time order); 0 or omitted = all")
    ap.add_argument("--no-mlflow", action="store_true")


def served_settings(policy_config: str | None, bundle: Any) -> Any:
    """The serving settings an offline evaluation serves: ``--policy-config``'s serving: / policy: sections, else
    the bundle's recipe."""
    from features.config import load_raw
    from serving.config import load_settings, settings_from_raw

    return settings_from_raw(load_raw(policy_config)) if policy_config else load_settings(None, bundle.manifest.config)


def read_log(args: argparse.Namespace, bundle: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``args.log`` in canonical form, parsed with ``--config`` or the dataset config the bundle was trained on."""
    from features.external import read_later_log
    from features.tables import FeatureTables
    from training.config import TrainConfig

    if args.config:
        cfg = load_config(args.config, args.overrides, TrainConfig)
    else:
        cfg = from_dict(TrainConfig, apply_overrides(bundle.manifest.config, args.overrides))
        cfg.validate()
    log, report = read_later_log(cfg, args.log, FeatureTables.load(bundle.path / "features"))
    if report.get("warning"):
        print(f"warning: {report['warning']}", file=sys.stderr)
    return log, report
