"""A second column layout works by config alone; the CLI reports user errors clearly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from features.build import build_features
from features.config import load_config
from features.external import read_later_log
from features.tables import FeatureTables
from tests.conftest import REPO, write_config


def test_other_column_layout_builds_identical_features(world, tmp_path):
    a = build_features(load_config(write_config(world, tmp_path / "a")), progress=False)
    b = build_features(load_config(write_config(world, tmp_path / "b", layout="alt")), progress=False)
    for table in ("interactions", "items", "users", "fans", "creators"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(a.out_dir / f"{table}.parquet"), pd.read_parquet(b.out_dir / f"{table}.parquet")
        )
    assert a.manifest["schema_hash"] == b.manifest["schema_hash"]


def test_rebuild_is_skipped_when_inputs_unchanged(world, tmp_path):
    cfg = load_config(write_config(world, tmp_path))
    first = build_features(cfg, progress=False)
    again = build_features(cfg, progress=False)
    assert not first.skipped and again.skipped
    cfg.quality.prior_strength = 5.0
    assert not build_features(cfg, progress=False).skipped


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "features", *args], cwd=REPO, capture_output=True, text=True)


def test_cli_errors_are_one_clear_line(synthetic_config, tmp_path):
    r = _cli("build", "--config", str(synthetic_config), "--set", "data.dir=/does/not/exist", "--no-progress")
    assert r.returncode == 2 and "input file not found: /does/not/exist/items.csv" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("build", "--config", str(synthetic_config), "--set", "split.valid_fractoin=0.1")
    assert r.returncode == 2 and "unknown config key 'split.valid_fractoin'" in r.stderr


def test_cli_builds_and_prints_the_summary(synthetic_config, tmp_path):
    r = _cli("build", "--config", str(synthetic_config), "--set", f"output_dir={tmp_path}", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "rows per period" in r.stdout and (tmp_path / "features" / "manifest.json").exists()


def test_later_log_counts_unknown_items_and_users(world, synthetic_config, synthetic_tables, tmp_path):
    log = world.log.head(500).copy()
    log.loc[log.index[:7], "video_id"] = 123456  # not in the catalogue
    log.loc[log.index[7:10], "user_id"] = 999999  # never seen
    path = tmp_path / "later.csv"
    log.to_csv(path, index=False)
    rows, report = read_later_log(load_config(synthetic_config), path, FeatureTables.load(synthetic_tables.dir))
    assert report["unknown_items"] == 7 and report["impressions"] == 493
    # These rows lie inside the bundle's own data: counted and flagged, not silently trusted.
    assert report["inside_bundle_data"] == 493 and "optimistic" in report["warning"]
    assert report["unknown_users"] >= 1 and (rows.loc[rows["user_id"] == "999999", "user_id_idx"] == 0).all()
    known = rows[rows["user_id"] != "999999"]
    assert set(known.columns) >= set(synthetic_tables.spec["item_numeric"]) | {"history", "is_fan"}


def test_every_unreadable_log_is_one_line_naming_the_file(world, synthetic_config, tmp_path):
    """Truncated gzip, empty gzip, header-only and garbage: exit 2, one line, the file named."""
    import gzip

    data = tmp_path / "data"
    shutil.copytree(Path(yaml.safe_load(synthetic_config.read_text())["data"]["dir"]), data)
    whole = gzip.compress((data / "log.csv").read_bytes())
    header = (data / "log.csv").read_text().splitlines()[0] + "\n"
    cases = {"truncated.csv.gz": whole[: len(whole) // 2], "empty.csv.gz": gzip.compress(b""),
             "header.csv.gz": gzip.compress(header.encode()), "header-only.csv": header.encode(),
             "garbage.csv.gz": b"not gzip at all"}
    for name, payload in cases.items():
        (data / name).write_bytes(payload)
        r = _cli("build", "--config", str(synthetic_config), "--set", f"data.dir={data}",
                 "--set", f"data.interactions.file={name}", "--set", f"output_dir={tmp_path / 'out'}", "--no-progress")
        assert r.returncode == 2, (name, r.stderr[-500:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(data / name) in lines[0] and lines[0].startswith("error: "), (name, r.stderr)


def test_id_positions_follow_the_tables_they_index(synthetic_tables):
    tables = FeatureTables(**{f: getattr(synthetic_tables, f) for f in
                              ("dir", "manifest", "items", "users", "creators", "fans", "vocabs", "behaviour")})
    items = tables.items["item_id"].astype(str)
    ids = pd.Series([items.iloc[3], "never-seen", items.iloc[0], items.iloc[3]])
    assert tables.positions("items", ids).tolist() == [3, -1, 0, 3]
    user = tables.users["user_id"].astype(str).iloc[-1]
    assert tables.positions("users", pd.Series([user])).tolist() == [len(tables.users) - 1]
    tables.items = tables.items.iloc[::-1].reset_index(drop=True)  # a new table: the cached index must not answer
    assert tables.positions("items", ids).tolist() == [len(items) - 4, -1, len(items) - 1, len(items) - 4]


def test_max_users_zero_means_all_and_a_negative_count_is_refused(capsys):
    import argparse

    from evaluation.choose_channels import add_arguments
    from evaluation.common import add_common_arguments
    from serving.offline import main as policy_main

    common = argparse.ArgumentParser()
    add_common_arguments(common, "out.json")
    choose = argparse.ArgumentParser()
    add_arguments(choose)
    assert common.parse_args(["--bundle", "b", "--max-users", "0"]).max_users is None  # was 0 users: an empty table
    assert common.parse_args(["--bundle", "b", "--max-users", "15"]).max_users == 15
    assert choose.parse_args(["--max-users", "0"]).max_users is None
    assert choose.parse_args([]).max_users == 2000
    for parser, argv in ((common, ["--bundle", "b"]), (choose, []), (None, ["--bundle", "b"])):
        for bad in ("-3", "many"):
            with pytest.raises(SystemExit) as e:
                (parser.parse_args if parser else policy_main)(argv + ["--max-users", bad])
            assert e.value.code == 2
            assert "--max-users" in capsys.readouterr().err
