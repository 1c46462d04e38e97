"""How input files are read (separator, header, names, encoding, compression), derived signals and
multi-valued attributes."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.config import ConfigError, MultiValuedSpec, TableSpec, load_config
from features.multi_valued import multi_hot, value_lists
from features.read_tables import DataValidationError, read_table
from tests.conftest import write_config


def test_headerless_pipe_file_in_latin1_reads_with_the_given_names(tmp_path):
    path = tmp_path / "u.item"
    path.write_bytes("1|Amélie (2001)|\"quoted\n2|Léon|y\n".encode("latin-1"))
    df = read_table(path, TableSpec(file="u.item", sep="|", header=False, names=["id", "title", "x"], encoding="latin-1"))
    assert list(df.columns) == ["id", "title", "x"]
    # No quoting in pipe files: a stray '"' is text, not the start of a quoted field.
    assert df["title"].tolist() == ["Amélie (2001)", "Léon"] and df["x"].tolist() == ['"quoted', "y"]


def test_tsv_gz_is_detected_by_name(tmp_path):
    path = tmp_path / "log.tsv.gz"
    path.write_bytes(gzip.compress(b"a\tb\n1\t2\n"))
    assert read_table(path).to_dict("list") == {"a": ["1"], "b": ["2"]}


@pytest.mark.parametrize("spec, message", [
    (TableSpec(file="f", sep="|", header=False, names=["a", "b"], encoding="latin-1"),
     "the config names 2 columns, the file has 3"),
    (TableSpec(file="f", sep="|", encoding="utf-8"), "set the file's encoding"),
])
def test_a_file_read_wrongly_is_one_clear_error(tmp_path, spec, message):
    path = tmp_path / "f"
    path.write_bytes("1|é|3\n4|5|6\n".encode("latin-1"))
    with pytest.raises(DataValidationError, match=message):
        read_table(path, spec)


def test_unknown_encoding_names_the_key(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("a\n1\n")
    with pytest.raises(ConfigError, match="unknown encoding 'klingon'"):
        read_table(path, TableSpec(file="f.csv", encoding="klingon"))


def test_multi_hot_keeps_the_most_frequent_values_and_pools_the_rest():
    lists = [["a", "b"], ["a"], ["c", "a", "a"], [], ["d"]]
    df = multi_hot("g", lists, max_values=2)
    # a (3 items) then b, c, d (1 each; ties by value): b kept, c and d pooled into __other__.
    assert list(df.columns) == ["g=a", "g=b", "g=__other__"]
    np.testing.assert_allclose(df.to_numpy(), [[0.5, 0.5, 0], [1, 0, 0], [0.5, 0, 0.5], [0, 0, 0], [0, 0, 1]])


def test_value_lists_from_flags_strings_and_lists():
    raw = pd.DataFrame({"Action": ["1", "0", "1"], "Drama": ["1", "0", "0"], "tags": ["x; y", "", "z"],
                        "lst": [["p", "q"], [], ["p"]]})
    assert value_lists(raw, "g", MultiValuedSpec(flags=["Action", "Drama"])) == [["Action", "Drama"], [], ["Action"]]
    assert value_lists(raw, "t", MultiValuedSpec(column="tags", sep=";")) == [["x", "y"], [], ["z"]]
    assert value_lists(raw, "l", MultiValuedSpec(column="lst")) == [["p", "q"], [], ["p"]]
    with pytest.raises(DataValidationError, match="set 'sep'"):
        value_lists(raw, "t", MultiValuedSpec(column="tags"))


def test_derived_signal_and_bad_rating_rows(world, tmp_path):
    from features.build import build_features

    path = write_config(world, tmp_path, layout="ratings")
    cfg = load_config(path)
    data = Path(cfg.data.dir) / "ratings.data"
    ratings = pd.read_csv(data, sep="\t", header=None, dtype=str)
    ratings.loc[3, 2] = "five"  # not a number: counted as wrong_type, quarantined
    ratings.to_csv(data, sep="\t", header=False, index=False)
    res = build_features(cfg, progress=False)
    assert res.manifest["validation"]["interactions"]["bad_rows"]["wrong_type"] == 1
    rows = pd.read_parquet(res.out_dir / "interactions.parquet")
    good = ratings.drop(index=3)
    assert len(rows) == len(good)
    assert rows["like"].sum() == int((pd.to_numeric(good[2]) >= 4).sum())
    assert "hour" not in rows.columns and (rows["creator_id"] == "item:" + rows["item_id"]).all()


@pytest.mark.parametrize("override, message", [
    ("data.signals.like.kind=continuous", "a derived signal .* is binary"),
    ("data.signals.like.value=null", "needs both 'op' and 'value'"),
    ("data.items.multi_valued.genre.max_values=0", "max_values must be >= 1"),
    ("data.items.names=[]", "data.items.header is false: list the file's columns"),
    ("data.users.names=[a, a, b, c]", "names repeats a column"),
    ("data.items.sep=||", "sep must be one character"),
])
def test_read_and_signal_options_are_checked_up_front(world, tmp_path, override, message):
    path = write_config(world, tmp_path, layout="ratings")
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])
