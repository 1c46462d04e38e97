"""Bad rows are counted per rule, quarantined, and the good rows build exactly what the clean log builds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.build import build_features
from features.config import load_config
from features.read_tables import DataValidationError
from tests.conftest import write_config


def _corrupt(log: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, int]]:
    """Insert bad copies of random clean rows; return the corrupted log and how many per rule."""
    log = log.astype(str)
    bad_rows, expected = [], {}

    def add(rule: str, n: int, mutate) -> None:
        for i in rng.choice(len(log), size=n, replace=False):
            row = log.iloc[i].copy()
            mutate(row)
            bad_rows.append(row)
        expected[rule] = n

    add("nan", 4, lambda r: r.__setitem__("user_id", ""))
    add("wrong_type", 3, lambda r: r.__setitem__("play_time_ms", "12s"))
    add("invalid_signal", 2, lambda r: r.__setitem__("is_like", "7"))
    add("negative_duration", 3, lambda r: r.__setitem__("duration_ms", "-5"))
    add("unknown_item", 5, lambda r: r.__setitem__("video_id", "999999"))
    add("unknown_user", 2, lambda r: r.__setitem__("user_id", "777777"))
    add("duplicate", 6, lambda r: None)  # an exact copy of a good row
    bad = pd.DataFrame(bad_rows)
    out = pd.concat([log, bad], ignore_index=True).sample(frac=1.0, random_state=1).reset_index(drop=True)
    return out, expected


def test_corrupted_log_quarantines_each_rule_and_keeps_good_output(world, tmp_path):
    clean_cfg = load_config(write_config(world, tmp_path / "clean"))
    clean = build_features(clean_cfg, progress=False)

    dirty_path = write_config(world, tmp_path / "dirty")
    dirty_log, expected = _corrupt(world.log, np.random.default_rng(3))
    dirty_log.to_csv(tmp_path / "dirty" / "data" / "log.csv", index=False)
    dirty = build_features(load_config(dirty_path), progress=False)

    counts = dirty.manifest["validation"]["interactions"]["bad_rows"]
    assert {k: v for k, v in counts.items() if v} == expected
    q = pd.read_csv(dirty.out_dir / "quarantine_interactions.csv", dtype=str, keep_default_na=False)
    assert len(q) == sum(expected.values())
    assert q["_rule"].value_counts().to_dict() == expected
    # each quarantined row points at its source row
    src = dirty_log.astype(str)
    for _, row in q.head(10).iterrows():
        assert src.iloc[int(row["_row"])]["video_id"] == row["video_id"]

    a = pd.read_parquet(clean.out_dir / "interactions.parquet")
    b = pd.read_parquet(dirty.out_dir / "interactions.parquet")
    pd.testing.assert_frame_equal(a, b)
    for table in ("items", "creators", "users", "fans"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(clean.out_dir / f"{table}.parquet"), pd.read_parquet(dirty.out_dir / f"{table}.parquet")
        )


def test_too_many_bad_rows_fail_with_rule_and_examples(world, tmp_path):
    path = write_config(world, tmp_path, validation={"max_bad_fraction": 0.001})
    log = world.log.astype(str).copy()
    log.loc[log.index[:200], "duration_ms"] = "-1"
    log.to_csv(tmp_path / "data" / "log.csv", index=False)
    with pytest.raises(DataValidationError, match=r"rule 'negative_duration': 200 rows, e\.g\. .*\"duration_ms\": \"-1\""):
        build_features(load_config(path), progress=False)
    # nothing lost: the report and the quarantine were written before failing
    q = pd.read_csv(tmp_path / "out" / "features" / "quarantine_interactions.csv")
    assert (q["_rule"] == "negative_duration").sum() == 200


def test_missing_column_names_the_column(world, tmp_path):
    path = write_config(world, tmp_path)
    world.log.drop(columns=["is_like"]).to_csv(tmp_path / "data" / "log.csv", index=False)
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['is_like'\]"):
        build_features(load_config(path), progress=False)


def test_zero_duration_keeps_row_with_missing_watch_ratio(world, tmp_path):
    path = write_config(world, tmp_path)
    log = world.log.copy()
    log.loc[log.index[:25], "duration_ms"] = 0
    log.to_csv(tmp_path / "data" / "log.csv", index=False)
    res = build_features(load_config(path), progress=False)
    v = res.manifest["validation"]["interactions"]
    assert v["good_rows"] == len(log) and v["notes"]["zero_duration_watch_ratio_missing"] == 25
    rows = pd.read_parquet(res.out_dir / "interactions.parquet")
    assert rows["watch_ratio"].isna().sum() == 25
    assert rows.loc[rows["watch_ratio"].isna(), "click"].notna().all()


def test_missing_input_file_is_a_clear_error(world, tmp_path):
    path = write_config(world, tmp_path)
    (tmp_path / "data" / "items.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"input file not found: .*items\.csv"):
        build_features(load_config(path), progress=False)
