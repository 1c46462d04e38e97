"""The retrieval stage reads only the columns and rows each step needs of interactions.parquet, and gets
the same values as from the whole table with the static columns joined (what it read before)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from features.build import build_features
from features.config import load_config
from features.tables import FeatureTables
from tests.conftest import write_config
from training.config import TrainConfig
from training.retrieval import rows as R
from training.retrieval.log import load_log, period_rows
from training.retrieval.data import InputLayout, ItemFeatures, train_tensors
from training.retrieval.metrics import make_eval_set
from training.retrieval.pipeline import _eval_users, _refit_queries, fit_retrieval, load_interactions

TINY = [
    "retrieval.embedding_dim=8", "retrieval.id_dim=8", "retrieval.feature_dim=4", "retrieval.hidden=[16]",
    "retrieval.batch_size=512", "retrieval.uniform_negatives=64", "retrieval.max_epochs=1",
    "retrieval.prior_betas=[0.0]", "retrieval.mf_weights=[0.0]", "retrieval.baselines.als=false",
    "retrieval.baselines.covisit_pop_weight=[1.0]",
]


def _small_groups(features: Path, tmp: Path) -> FeatureTables:
    """A copy of the feature tables with interactions.parquet in row groups of 997 rows (a batch and a row
    group then never line up, and a period spans many groups)."""
    d = tmp / "features"
    shutil.copytree(features, d)
    path = d / "interactions.parquet"
    pq.write_table(pq.read_table(path), path, row_group_size=997)
    return FeatureTables.load(d)


@pytest.fixture(scope="module")
def small_groups(synthetic_tables: FeatureTables, tmp_path_factory) -> FeatureTables:
    return _small_groups(synthetic_tables.dir, tmp_path_factory.mktemp("rows"))


@pytest.fixture(scope="module")
def ratings(world, tmp_path_factory) -> tuple[Path, FeatureTables]:
    """The ratings layout: static item numerics (genre flags) that the rows lack and join_static adds."""
    root = tmp_path_factory.mktemp("ratings")
    path = write_config(world, root, layout="ratings")
    out = build_features(load_config(path), progress=False).out_dir
    return path, _small_groups(out, root)


@pytest.mark.parametrize("world_layout, weights", [
    ("kuairand", []),
    ("kuairand", ["retrieval.impression_weight=0.5", "retrieval.signal_weights={click: 0.5}"]),
    ("ratings", []),
])
def test_projected_reads_equal_the_whole_table(synthetic_config: Path, small_groups: FeatureTables, ratings,
                                               world_layout: str, weights: list[str]):
    config, tables = (synthetic_config, small_groups) if world_layout == "kuairand" else ratings
    cfg = load_config(config, weights, TrainConfig)
    rc = cfg.retrieval
    static = [c for c in tables.spec["item_numeric"]
              if c not in pq.read_schema(tables.dir / "interactions.parquet").names]
    assert bool(static) == (world_layout == "ratings")  # the ratings layout's genre flags: item_num_stats' static branch
    layout = InputLayout.from_tables(tables)
    whole, log = load_interactions(tables), load_log(cfg, tables)
    assert "history" not in log.columns and not set(layout.item_num) & set(log.columns)
    for c in log.columns:
        assert (log[c].astype(str) if c == "period" else log[c]).equals(whole[c]), c
    feats_whole, feats = ItemFeatures(cfg, tables, layout, whole), ItemFeatures(cfg, tables, layout, log)
    np.testing.assert_array_equal(feats.num, feats_whole.num)

    train = whole[whole["period"] == "train"]
    w = rc.row_weights(train)
    expect = train_tensors(train[w > 0], layout, feats_whole, w[w > 0])
    got = R.positive_tensors(cfg, tables, layout, feats, "train")
    assert len(got) == int((w > 0).sum()) > 0
    for name in ("user_cat", "history", "item_row", "block", "weight"):
        assert torch.equal(getattr(got, name), getattr(expect, name)), name

    num = train[layout.item_num].to_numpy(np.float64)
    mean, std = R.item_num_stats(tables, layout, period_rows(log, "train"))
    np.testing.assert_array_equal(mean, np.nan_to_num(np.nanmean(num, axis=0)).astype(np.float32))
    expect_std = np.nan_to_num(np.nanstd(num, axis=0)).astype(np.float32)
    expect_std[expect_std < 1e-6] = 1.0
    np.testing.assert_array_equal(std, expect_std)

    for period in ("valid", "test"):
        rows = whole[whole["period"] == period]
        es = make_eval_set(train, rows, feats.item_ids, rc.positive_signal)
        assert es.n_users > 0
        want = layout.user_arrays(rows.iloc[es.first_row])
        have = layout.user_arrays(_eval_users(tables, layout, es, period_rows(log, period)))
        for k in want:
            np.testing.assert_array_equal(have[k], want[k])

    last = whole.drop_duplicates("user_id", keep="last")
    want = layout.user_arrays(last.sample(min(50, len(last)), random_state=3))
    have = _refit_queries(tables, log, layout, 50, 3)
    for k in want:
        np.testing.assert_array_equal(have[k], want[k])


def test_fit_reads_no_whole_table(synthetic_config: Path, small_groups: FeatureTables, tmp_path: Path, monkeypatch):
    """A whole fit (train, evaluate, export) reads interactions.parquet column by column: never every column,
    never ``history`` through pandas (only positives' and chosen rows' through pyarrow), never the loader
    of the whole table."""
    import training.retrieval.pipeline as pipeline

    reads: list[list[str] | None] = []
    read_parquet = pd.read_parquet

    def recording(path, *args, columns=None, **kw):
        if Path(path).name == "interactions.parquet":
            reads.append(columns)
        return read_parquet(path, *args, columns=columns, **kw)

    def whole(*_):
        raise AssertionError("the retrieval stage loaded the whole interaction table")

    monkeypatch.setattr(pd, "read_parquet", recording)
    monkeypatch.setattr(pipeline, "load_interactions", whole)
    metrics = fit_retrieval(load_config(synthetic_config, TINY, TrainConfig), small_groups, tmp_path, progress=False)
    assert metrics["test_users"] > 0
    assert reads and all(cols is not None and "history" not in cols for cols in reads), reads
    assert max(len(cols) for cols in reads) < 20
