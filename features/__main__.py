"""python -m features build --config configs/kuairand.yaml [--set key=value ...] [--force]"""

from __future__ import annotations

import argparse
import json

from features.build import build_features
from features.cli_common import add_config_args, config_from_args, run_cli


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m features", description="feedstack feature pipeline")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="validate logs and build time-correct feature tables")
    add_config_args(b)
    b.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")
    b.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    cfg = config_from_args(args)
    res = build_features(cfg, force=args.force, progress=not args.no_progress)
    m = res.manifest
    if res.skipped:
        print(f"features up to date in {res.out_dir} (inputs unchanged; --force to rebuild)")
    for name, v in m["validation"].items():
        bad = {k: n for k, n in v["bad_rows"].items() if n}
        print(f"validation {name}: {v['rows']} rows, {v['good_rows']} good, bad {bad or 'none'}, notes {v['notes'] or 'none'}")
    print(f"rows per period: {json.dumps(m['rows'])}; split: {json.dumps(m['split']['iso'])}")
    print(f"entities: {json.dumps(m['entities'])}; built in {m['build_seconds']} s -> {res.out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
