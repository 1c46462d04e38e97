"""Argument handling shared by every feedstack CLI: ``--config FILE`` and repeated ``--set key=value``."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, TypeVar

from features.config import Config, ConfigError, load_config

T = TypeVar("T")


def add_config_args(p: argparse.ArgumentParser, default: str = "configs/kuairand.yaml") -> None:
    p.add_argument("--config", default=default, help=f"YAML config (default: {default})")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set data.dir=../shared/data/kuairand-pure-subset (repeatable)",
    )


def user_count(text: str) -> int | None:
    """``--max-users``: the first N users, 0 for all of them (None); a negative or non-integer count is an
    argument error rather than an empty evaluation."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of users (0 = all), got '{text}'") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"a number of users >= 0 (0 = all), got {n}")
    return n or None


def config_from_args(args: argparse.Namespace, cls: type[T] = Config) -> T:  # type: ignore[assignment]
    return load_config(args.config, args.overrides, cls)


def run_cli(main: Callable[[], int]) -> None:
    """Turn user errors into one clear line and exit code 2 instead of a traceback."""
    try:
        code = main()
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
