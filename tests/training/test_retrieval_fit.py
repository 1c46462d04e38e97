"""Two-tower fit on the synthetic world: learns, exports with parity, resumes, evaluates a bundle."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from features.build import build_features
from features.config import ConfigError, load_config
from features.external import read_later_log
from features.split import iso
from features.synthetic import write_world
from features.tables import FeatureTables
from training.config import TrainConfig
from training.onnx_export import check_parity
from training.retrieval.data import InputLayout
from training.retrieval.evaluate import evaluate_retrieval, item_feeds
from training.retrieval.pipeline import fit_retrieval
from training.retrieval.ship import onnx_vectors

TINY = [
    "retrieval.embedding_dim=16", "retrieval.id_dim=16", "retrieval.feature_dim=8", "retrieval.hidden=[32]",
    "retrieval.batch_size=256", "retrieval.uniform_negatives=128", "retrieval.max_epochs=6",
    "retrieval.patience=6", "retrieval.temperature=0.1", "retrieval.learning_rate=0.01",
    "retrieval.prior_betas=[0.0, 0.1]", "retrieval.baselines.als_factors=[4]", "retrieval.baselines.als_iterations=5",
    "retrieval.baselines.als_impression_weight=[0.3]", "retrieval.baselines.covisit_pop_weight=[1.0]",
]


def _cfg(path: Path, *extra: str) -> TrainConfig:
    return load_config(path, TINY + list(extra), TrainConfig)


@pytest.fixture(scope="module")
def fitted(synthetic_config: Path, synthetic_tables: FeatureTables, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("retrieval") / "retrieval"
    metrics = fit_retrieval(_cfg(synthetic_config, "retrieval.prior_days=[0, 2]"), synthetic_tables, out, progress=False)
    return out, metrics


def test_fit_writes_the_stage_outputs(fitted, synthetic_tables):
    out, metrics = fitted
    for name in ("user_tower.onnx", "item_tower.onnx", "item_vectors.npy", "index.faiss", "retrieval.json",
                 "metrics.json", "recall_vs_k.png", "checkpoints/last.ckpt"):
        assert (out / name).exists(), name
    vecs = np.load(out / "item_vectors.npy")
    assert vecs.dtype == np.float32 and vecs.shape == (len(synthetic_tables.items), 17)  # + the prior's dimension
    np.testing.assert_allclose(np.linalg.norm(vecs[:, :16], axis=1), 1.0, atol=1e-5)
    meta = json.loads((out / "retrieval.json").read_text())
    # The prior column is log(1 + positives) over the chosen window at the end of the log (0 = all of it);
    # the user side carries the chosen beta.
    days, beta = meta["prior"]["days"], meta["prior"]["beta"]
    assert metrics["valid"]["prior"] == {"days": days, "beta": beta} and metrics["protocol"]["prior_days"] == days
    log = pd.read_parquet(synthetic_tables.dir / "interactions.parquet")
    for window in (days, 2.0):  # the chosen one, and the recent one whatever was chosen (see below)
        recent = log[log["ts"] >= log["ts"].max() + 1 - window * 86_400_000] if window > 0 else log
        counts = recent[recent["long_view"] > 0]["item_id"].astype(str).value_counts()
        expect = np.log1p(synthetic_tables.items["item_id"].astype(str).map(counts).fillna(0).to_numpy())
        if window == days:
            np.testing.assert_allclose(vecs[:, 16], expect, rtol=1e-5)
        else:
            assert 0 < (expect > 0).sum() < (vecs[:, 16] > 0).sum()  # the recent window really is narrower
    assert (days, beta) in {(0.0, 0.0), (0.0, 0.1), (2.0, 0.1)} and meta["embedding_dim"] == 17
    assert set(metrics["baselines"]) == {"popularity", "recent_popularity", "mf", "covisit"}
    assert set(metrics["valid"]["prior_sweep"]) == {"0d:0.0", "0d:0.1", "2d:0.1"}
    layout = InputLayout.from_tables(synthetic_tables)
    assert meta["user_tower"]["inputs"][0]["columns"] == layout.user_cat
    assert meta["item_tower"]["inputs"][1]["columns"] == layout.item_num
    assert meta["item_vectors"]["item_ids"] == synthetic_tables.items["item_id"].astype(str).tolist()
    assert meta["index"]["recall@100_vs_exact"] > 0.99  # Flat
    assert json.loads((out / "metrics.json").read_text())["model"] == metrics["model"]


def test_item_features_match_the_feature_build(synthetic_config, synthetic_tables):
    """The per-block item aggregates recomputed for negatives and candidates equal what the build stored."""
    from training.retrieval.data import ItemFeatures
    from training.retrieval.pipeline import load_interactions

    cfg = _cfg(synthetic_config)
    layout = InputLayout.from_tables(synthetic_tables)
    rows = load_interactions(synthetic_tables)
    feats = ItemFeatures(cfg, synthetic_tables, layout, rows)
    got = feats.num[rows["block"].to_numpy(), feats.rows_of(rows["item_id"])]
    np.testing.assert_array_equal(got, rows[layout.item_num].to_numpy(np.float32))
    np.testing.assert_array_equal(feats.num[-1], synthetic_tables.items[layout.item_num].to_numpy(np.float32))


def test_model_beats_popularity_on_synthetic_interests(fitted):
    _, m = fitted
    # Users in the synthetic world pick items by topic interest: a working model must beat both the
    # non-personal baselines and a random ranking (expected recall@50 = 50 / candidates).
    assert m["test_users"] > 50
    popular = [m["baselines"][n] for n in ("popularity", "recent_popularity")]
    assert m["model"]["recall@50"] > max(b["recall@50"] for b in popular) + 0.03, m
    assert m["model"]["recall@50"] > 2 * 50 / m["candidates"]
    assert m["model"]["ndcg@50"] > max(b["ndcg@50"] for b in popular)
    # The personal baselines learn the interests too (they are meant to be strong, not strawmen).
    assert m["baselines"]["mf"]["recall@50"] > 2 * 50 / m["candidates"]


def test_onnx_parity_on_fresh_inputs(fitted, synthetic_config, synthetic_tables):
    from training.retrieval.data import ItemFeatures
    from training.retrieval.pipeline import build_model, load_interactions

    out, _ = fitted
    cfg = _cfg(synthetic_config)
    layout = InputLayout.from_tables(synthetic_tables)
    feats = ItemFeatures(cfg, synthetic_tables, layout, load_interactions(synthetic_tables))
    n = len(layout.item_num)
    model = build_model(layout, feats, cfg.retrieval, np.zeros(n, np.float32), np.ones(n, np.float32))
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    g = torch.Generator().manual_seed(123)  # not the export seed

    def users(b):
        return {"user_cat": torch.stack([torch.randint(0, s, (b,), generator=g) for s in layout.user_cat_sizes], 1),
                "history": torch.randint(0, layout.item_cat_sizes[0], (b, layout.history_length), generator=g)}

    def items(b):
        return {"item_cat": torch.stack([torch.randint(0, s, (b,), generator=g) for s in layout.item_cat_sizes], 1),
                "item_num": torch.rand(b, n, generator=g) * 3}

    from training.retrieval.model import PriorUserTower

    beta = json.loads((out / "retrieval.json").read_text())["prior"]["beta"]
    user_tower = PriorUserTower(model.user_tower, beta).eval()
    for module, path, make in ((user_tower, "user_tower.onnx", users), (model.item_tower, "item_tower.onnx", items)):
        rep = check_parity(module, out / path, make, batch_sizes=(1, 5, 33))
        assert rep.max_abs_diff < 1e-4, (path, rep)
    # The shipped catalogue vectors are the exported item tower on items.parquet, plus the prior column.
    vecs = onnx_vectors(out / "item_tower.onnx", layout.item_arrays(synthetic_tables.items))
    np.testing.assert_allclose(vecs, np.load(out / "item_vectors.npy")[:, :-1], atol=1e-6)


def test_history_encoder_fits_and_ships_with_parity(synthetic_config, synthetic_tables, tmp_path):
    """retrieval.history_encoder_layers: the user tower gains the self-attention encoder, trains, and its ONNX
    export passes the stage's own parity check (histories with padding, and all padding, included)."""
    out = tmp_path / "retrieval"
    cfg = _cfg(synthetic_config, "retrieval.history_encoder_layers=1", "retrieval.max_epochs=2",
               "retrieval.baselines.als=false", "retrieval.baselines.covisit=false")
    m = fit_retrieval(cfg, synthetic_tables, out, progress=False)
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert any(".encoder.blocks.0.qkv." in k for k in ckpt["state_dict"])
    meta = json.loads((out / "retrieval.json").read_text())
    assert max(meta["parity"]["max_abs_diff"].values()) < meta["parity"]["tolerance"], meta["parity"]
    assert m["model"]["recall@100"] > m["baselines"]["popularity"]["recall@100"]
    with pytest.raises(ConfigError, match="history_encoder_heads"):
        _cfg(synthetic_config, "retrieval.history_encoder_heads=5")


def test_resume_continues_from_last_checkpoint(synthetic_config, synthetic_tables, tmp_path):
    out = tmp_path / "retrieval"
    first = fit_retrieval(_cfg(synthetic_config, "retrieval.max_epochs=2"), synthetic_tables, out, progress=False)
    assert first["training"]["epochs"] == 2 and first["training"]["resumed_from_epoch"] is None
    # As after a kill: last.ckpt is on disk; a longer run with --resume picks up at epoch 2, not 0.
    again = fit_retrieval(_cfg(synthetic_config, "retrieval.max_epochs=4"), synthetic_tables, out, resume=True,
                          progress=False)
    assert again["training"]["resumed_from_epoch"] == 1
    assert again["training"]["epochs_run_now"] == 2
    assert again["training"]["epochs"] == 4
    assert [r["epoch"] for r in again["training"]["val_history"]] == [2, 3]
    # Without --resume the checkpoints are cleared and training starts over.
    fresh = fit_retrieval(_cfg(synthetic_config, "retrieval.max_epochs=1"), synthetic_tables, out, progress=False)
    assert fresh["training"]["resumed_from_epoch"] is None and fresh["training"]["epochs_run_now"] == 1


def test_bad_positive_signal_is_named(synthetic_config, synthetic_tables, tmp_path):
    with pytest.raises(ConfigError, match="retrieval.positive_signal = 'watch_time'"):
        fit_retrieval(_cfg(synthetic_config, "retrieval.positive_signal=watch_time"), synthetic_tables, tmp_path)


def test_evaluate_bundle_matches_fit_time_test_metrics(fitted, world, synthetic_config, synthetic_tables, tmp_path):
    """A bundle whose data ends where the test period starts, evaluated on the test days as a later log,
    gives the fit-time test numbers: same users, candidates, exclusions, features and vectors."""
    out, metrics = fitted
    split = synthetic_tables.manifest["split"]
    test_start, valid_start = split["test_start"], split["valid_start"]
    before = dataclasses.replace(world, log=world.log[world.log["time_ms"] < test_start])
    raw = write_world(before, tmp_path / "data", tmp_path / "bundle")
    # Same train period (so the same vocabularies); the valid period is cut in two, both count as seen.
    # (ISO strings with an offset: the config's `str | int` field reads an int as text.)
    raw["split"] = {"mode": "dates", "valid_start": iso(valid_start), "test_start": iso((valid_start + test_start) // 2)}
    cfg_path = tmp_path / "config.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path, TINY, TrainConfig)
    build_features(cfg, progress=False)
    tables = FeatureTables.load(cfg.features_dir)
    bundle = tmp_path / "bundle"
    rdir = bundle / "retrieval"
    rdir.mkdir()
    for name in ("user_tower.onnx", "item_tower.onnx", "retrieval.json"):
        shutil.copy(out / name, rdir / name)
    # Item inputs by the column lists of retrieval.json, as serving builds them (the config written here
    # lists signals in another order, so the new build's feature_spec orders its numeric columns differently).
    meta = json.loads((rdir / "retrieval.json").read_text())
    # The prior column as of the bundle's end: log(1 + positives) over everything before the test days.
    seen = pd.read_parquet(tables.dir / "interactions.parquet")
    counts = seen[seen["long_view"] > 0]["item_id"].astype(str).value_counts()
    prior = np.log1p(tables.items["item_id"].astype(str).map(counts).fillna(0).to_numpy(np.float32))
    vecs = onnx_vectors(rdir / "item_tower.onnx", item_feeds(meta, tables.items))
    np.save(rdir / "item_vectors.npy", np.hstack([vecs, prior.reshape(-1, 1)]).astype(np.float32))

    later = tmp_path / "later.csv"
    world.log[world.log["time_ms"] >= test_start].to_csv(later, index=False)
    rows, report = read_later_log(cfg, later, tables)
    assert report["inside_bundle_data"] == 0 and "warning" not in report  # the log starts after the bundle's data
    got = evaluate_retrieval(bundle, rows, tables, cfg)
    assert got["test_users"] == metrics["test_users"]
    assert got["candidates"] == metrics["candidates"]
    for key, value in metrics["model"].items():
        assert got["model"][key] == pytest.approx(value, abs=1e-4), key
    for key, value in metrics["baselines"]["popularity"].items():
        assert got["baselines"]["popularity"][key] == pytest.approx(value, abs=1e-12), key
    # MF and co-visitation are refit on the bundle's data with the hyper-parameters the fit chose.
    for name in ("mf", "covisit"):
        assert got["baselines"][name]["recall@50"] == pytest.approx(metrics["baselines"][name]["recall@50"], abs=0.02)


def test_mf_dimensions_ride_in_the_served_vectors(synthetic_config: Path, synthetic_tables: FeatureTables,
                                                  tmp_path: Path):
    """Folding the tuned MF baseline in: the sweep picks the MF weight with beta on validation, the exported
    user tower carries weight x the ALS user factors by user index (0 for unknown users), the item vectors
    the ALS item factors, and the test table shows the towers alone beside it."""
    from training.retrieval.data import InputLayout
    from training.retrieval.served_dims import mf_fit

    cfg = _cfg(synthetic_config, "retrieval.mf_weights=[0.0, 2.0]", "retrieval.max_epochs=2")
    out = tmp_path / "retrieval"
    metrics = fit_retrieval(cfg, synthetic_tables, out, progress=False)
    sweep = metrics["valid"]["mf_weight_sweep"]
    assert set(sweep) == {"0.0", "2.0"}
    chosen = metrics["protocol"]["mf_weight"]
    assert sweep[str(chosen)]["recall@100"] == max(v["recall@100"] for v in sweep.values())
    # Force the MF dimensions on to check what ships.
    cfg = _cfg(synthetic_config, "retrieval.mf_weights=[2.0]", "retrieval.max_epochs=2")
    metrics = fit_retrieval(cfg, synthetic_tables, out, progress=False)
    assert metrics["protocol"]["mf_weight"] == 2.0 and "two_tower_alone" in metrics["baselines"]
    # With MF dimensions the MF channel is measured alone and tried in the validation quota mixes.
    sweep = metrics["valid"]["channel_sweep"]
    assert 0 < sweep["single"]["mf"] <= 1 and "mf" in metrics["channels"]["single"]
    assert {m["quotas"].get("mf", 0) for m in sweep["merged"]} == set(cfg.retrieval.channel_mf)
    ch = metrics["channels"]
    vs = ch["merged_vs_best_single"]
    assert ch["single"][vs["channel"]] == max(ch["single"].values())
    assert vs["difference"] == pytest.approx(ch["merged"] - ch["single"][vs["channel"]], abs=1e-9)
    assert vs["ci95"][0] <= vs["difference"] <= vs["ci95"][1]
    meta = json.loads((out / "retrieval.json").read_text())
    d, f = meta["mf"]["dimensions"]
    assert (d, f) == (16, 20) and meta["prior"]["dimension"] == 20 and meta["embedding_dim"] == 21
    vecs = np.load(out / "item_vectors.npy")
    assert vecs.shape == (len(synthetic_tables.items), 21)
    layout = InputLayout.from_tables(synthetic_tables)
    rows = pd.read_parquet(synthetic_tables.dir / "interactions.parquet")
    from training.retrieval.data import ItemFeatures

    mf = mf_fit(cfg.retrieval, rows, ItemFeatures(cfg, synthetic_tables, layout, rows).item_ids, synthetic_tables,
                 layout.user_cat_sizes[0], meta["baselines"]["mf"], 2.0, cfg.seed)
    np.testing.assert_allclose(vecs[:, d:f], mf.items, atol=1e-5)
    np.testing.assert_allclose(np.load(out / meta["mf"]["user_factors_file"]), mf.table, atol=1e-6)
    users = synthetic_tables.users.iloc[:50]
    feeds = layout.user_arrays(users)
    feeds["user_cat"] = feeds["user_cat"].copy()
    feeds["user_cat"][:5, 0] = 0  # unknown users
    uv = onnx_vectors(out / "user_tower.onnx", feeds)
    assert uv.shape == (50, 21)
    np.testing.assert_allclose(uv[:, d:f], mf.table[feeds["user_cat"][:, 0]], atol=1e-5)
    assert not uv[:5, d:f].any() and np.abs(uv[5:, d:f]).sum() > 0
    np.testing.assert_allclose(uv[:, f], meta["prior"]["beta"], atol=1e-6)
