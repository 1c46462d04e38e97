"""Hashed id vocabularies (``vocab.hash_buckets``): a fixed table size, a hash that is the same in every
process, recorded in vocab.json so serving encodes requests as the feature build did; a fit and a served
bundle with hashed ids work end to end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.build import build_features
from features.config import ConfigError, load_config
from features.synthetic import World
from features.tables import FeatureTables
from features.vocab import Vocab, load_vocabs, request_lookup, save_vocabs
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[2]
BUCKETS = {"user_id": 50, "item_id": 97, "creator_id": 13}


def test_hashed_vocab_is_the_documented_hash_and_round_trips(tmp_path: Path):
    v = Vocab("item_id", hash_buckets=97)
    ids = ["1", "42", "abc", "42", "ü"]
    expect = [1 + int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") % 97 for i in ids]
    assert v.encode(ids).tolist() == expect
    assert len(v) == 98 and all(1 <= e <= 97 for e in expect)
    save_vocabs({"item_id": v, "tab": Vocab("tab", ["a", "b"])}, tmp_path / "vocab.json")
    raw = json.loads((tmp_path / "vocab.json").read_text())
    assert raw == {"item_id": {"hash": "blake2b-64", "buckets": 97}, "tab": ["a", "b"]}
    back = load_vocabs(tmp_path / "vocab.json")
    assert back["item_id"].encode(ids).tolist() == expect and back["tab"].encode(["b", "z"]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="hashed"):
        v.decode(np.array([3]))


def test_hash_is_the_same_in_another_process():
    """Python's own hash() of a str changes with PYTHONHASHSEED; this one must not."""
    ids = [str(i) for i in range(50)]
    code = f"from features.vocab import Vocab; print(Vocab('u', hash_buckets=1000).encode({ids!r}).tolist())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"},
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == Vocab("u", hash_buckets=1000).encode(ids).tolist()


def test_hash_buckets_config_is_checked(synthetic_config: Path):
    with pytest.raises(ConfigError, match="vocab.hash_buckets.tab"):
        load_config(synthetic_config, ["vocab.hash_buckets={tab: 10}"])
    with pytest.raises(ConfigError, match="vocab.hash_buckets.item_id must be >= 1"):
        load_config(synthetic_config, ["vocab.hash_buckets={item_id: 0}"])


@pytest.fixture(scope="module")
def hashed(world: World, tmp_path_factory) -> tuple[Path, FeatureTables]:
    root = tmp_path_factory.mktemp("hashed")
    path = write_config(world, root, vocab={"hash_buckets": BUCKETS})
    res = build_features(load_config(path), progress=False)
    return path, FeatureTables.load(res.out_dir)


def test_build_with_hashing_sizes_tables_by_config_and_serving_encodes_the_same(hashed):
    _, tables = hashed
    spec = tables.spec
    assert spec["user_categorical"]["user_id"] == 51
    assert spec["item_categorical"]["item_id"] == 98 and spec["item_categorical"]["creator_id"] == 14
    raw = json.loads((tables.dir / "vocab.json").read_text())
    for name, buckets in BUCKETS.items():
        assert raw[name] == {"hash": "blake2b-64", "buckets": buckets}
    items, users = tables.items, tables.users
    assert items["item_id_idx"].between(1, 97).all() and users["user_id_idx"].between(1, 50).all()
    # Serving's lookup (built from vocab.json by request_lookup, as serving/bundle.py does) equals the
    # training-side encoding stored in the tables.
    lookup = request_lookup("user_id", raw["user_id"])
    assert [lookup.get(u, 0) for u in users["user_id"].astype(str)] == users["user_id_idx"].tolist()
    item_lookup = request_lookup("item_id", raw["item_id"])
    assert [item_lookup.get(i, 0) for i in items["item_id"].astype(str)] == items["item_id_idx"].tolist()
    log = pd.read_parquet(tables.dir / "interactions.parquet")
    for c in ("user_id", "item_id", "creator_id"):  # the training rows carry the same encoding
        assert (log[f"{c}_idx"].to_numpy() == tables.vocabs[c].encode(log[c])).all(), c


def test_fit_and_serve_with_hashed_ids(hashed, tmp_path: Path):
    import torch

    from serving.bundle import load_bundle
    from serving.config import ServeSettings
    from serving.recommender import Recommender
    from training.bundle import assemble_bundle
    from training.config import TrainConfig
    from training.ranking.pipeline import fit_ranking
    from training.retrieval.pipeline import fit_retrieval

    path, tables = hashed
    cfg = load_config(path, [f"output_dir={tmp_path}", "retrieval.max_epochs=2", "retrieval.embedding_dim=16",
                             "retrieval.id_dim=16", "retrieval.hidden=[32]", "retrieval.feature_dim=8",
                             "retrieval.uniform_negatives=128", "retrieval.baselines.als=false",
                             "retrieval.baselines.covisit=false", "ranking.max_epochs=2",
                             "ranking.expert_hidden=[32,16]", "ranking.tower_hidden=8",
                             "ranking.single_task_baselines=false", "ranking.gbdt_baseline=false",
                             "ranking.hybrid=false"], TrainConfig)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = {"retrieval": fit_retrieval(cfg, tables, tmp_path / "retrieval", progress=False),
                   "ranking": fit_ranking(cfg, tables, tmp_path / "ranking", progress=False)}
    finally:
        torch.set_num_threads(before)
    meta = json.loads((tmp_path / "ranking" / "ranking.json").read_text())
    assert meta["model"]["cat_sizes"][meta["layout"]["cat_vocabs"].index("item_id")] == 98
    assert metrics["ranking"]["model"]["click"]["auc"] > 0.6  # hashing 400 items into 97 buckets still learns
    assert metrics["retrieval"]["model"]["recall@200"] > 0
    shutil.copytree(tables.dir, tmp_path / "features")
    rec = Recommender(load_bundle(assemble_bundle(cfg, metrics)), ServeSettings())
    user = str(tables.users["user_id"].iloc[0])
    assert rec.bundle.vocab_maps["user_id"].get(user, 0) == int(tables.users["user_id_idx"].iloc[0])
    page = rec.recommend(user, 5)
    assert len(page.items) == 5 and all(np.isfinite(i.score) for i in page.items)
