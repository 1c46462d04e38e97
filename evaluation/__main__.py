"""feedstack offline evaluation CLI.

    python -m evaluation policy --bundle runs/full/heldout-bundle [--period valid|test | --log LATER.csv] --out policy.json
    python -m evaluation channels --bundle runs/full/heldout-bundle [--period valid|test | --log LATER.csv] --out channels.json
    python -m evaluation choose-channels --config configs/kuairand.yaml   (the served quotas, by the page on valid)

(`python -m training evaluate-policy ...` forwards here, so existing scripts keep working.)
"""

from __future__ import annotations

import argparse

from evaluation import channels, choose_channels, policy
from features.cli_common import run_cli


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation", description="feedstack offline evaluation")
    sub = ap.add_subparsers(dest="command", required=True)
    policy.add_arguments(sub.add_parser("policy", help="feed policy vs engagement-only, offline (serving.offline protocol)"))
    channels.add_arguments(sub.add_parser(
        "channels", help="served feed from the merged candidates vs each channel alone (serving.offline_channels)"))
    choose_channels.add_arguments(sub.add_parser(
        "choose-channels",
        help="choose the page's retrieval weight and the channel quotas by the served page on validation, into the bundles"))
    args = ap.parse_args()
    return {"policy": policy.run, "channels": channels.run, "choose-channels": choose_channels.run}[args.command](args)


if __name__ == "__main__":
    run_cli(main)
