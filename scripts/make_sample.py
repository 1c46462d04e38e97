"""Cut the shipped KuaiRand sample from the full 11-day slice.

Keeps every impression of a deterministic subset of users (user_id % modulus == 0) so the sample has the
same 11 days, the same time structure and whole user histories; the item table is kept whole (it is the
catalogue) and the user table is cut to the kept users.

    python scripts/make_sample.py --src ../shared/data/kuairand-pure-subset --dst data/kuairand-sample
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

LOG = "log_standard_20220425_to_20220505_pure.csv.gz"
USERS = "user_features_pure.csv"
ITEMS = "video_features_basic_pure.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--dst", type=Path, required=True)
    ap.add_argument("--modulus", type=int, default=5)
    args = ap.parse_args()
    args.dst.mkdir(parents=True, exist_ok=True)
    # Read as text so the sample is byte-for-byte the original values.
    log = pd.read_csv(args.src / LOG, dtype=str, keep_default_na=False)
    keep = log["user_id"].astype(int) % args.modulus == 0
    log[keep].to_csv(args.dst / LOG, index=False, compression={"method": "gzip", "mtime": 0})
    users = pd.read_csv(args.src / USERS, dtype=str, keep_default_na=False)
    # Same file names as the source, so one config reads both (only data.dir differs).
    users[users["user_id"].astype(int) % args.modulus == 0].to_csv(args.dst / USERS, index=False)
    items = pd.read_csv(args.src / ITEMS, dtype=str, keep_default_na=False)
    items.to_csv(args.dst / ITEMS, index=False)
    print(f"kept {int(keep.sum())} of {len(log)} impressions, {keep.groupby(log['user_id']).any().sum()} users")


if __name__ == "__main__":
    main()
