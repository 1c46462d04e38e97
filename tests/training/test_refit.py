"""Production refit: both stages retrained on every day with the held-out fit's epochs and calibration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
import torch

from features.bundle import verify_bundle
from features.config import load_config
from features.tables import FeatureTables
from training.bundle import assemble_bundle
from training.config import TrainConfig
from training.refit import ranking_plan, refit_config, retrieval_plan, run_refit


LATE_ITEMS = 5


@pytest.fixture(scope="module")
def refitted(synthetic_config: Path, synthetic_bundle: Path, synthetic_tables: FeatureTables,
             tmp_path_factory) -> tuple[Path, dict, dict, TrainConfig, set[int]]:
    """The synthetic log with a few items' train-period impressions removed (so they are first shown after
    the held-out fit's train period), refitted with the held-out bundle's epochs and calibration."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("refit_run")
    base = load_config(synthetic_config, [], TrainConfig)
    data = out / "data"
    shutil.copytree(base.data.dir, data)
    log_path = data / base.data.interactions.file
    log = pd.read_csv(log_path)
    ts_col = base.data.interactions.columns["ts"]
    item_col = base.data.interactions.columns["item_id"]
    valid_start = synthetic_tables.manifest["split"]["valid_start"]
    later = log.loc[log[ts_col] >= valid_start, item_col].value_counts()
    late = set(int(i) for i in later.index[:LATE_ITEMS])
    log[~(log[item_col].isin(late) & (log[ts_col] < valid_start))].to_csv(log_path, index=False)
    (out / "ranking").mkdir()
    # The held-out fit as a hybrid ranker blending the first 5 of click's 8 trees (a trees' budget cut them;
    # whatever the synthetic fit chose).
    meta = json.loads((Path(synthetic_bundle).parent / "ranking" / "ranking.json").read_text())
    meta["calibration"]["gbdt_weight"] = [0.5 if h["name"] == "click" else 0.0 for h in meta["heads"]]
    meta["hybrid"] = {"gbdt_rounds": {"click": 5}, "baseline_rounds": {"click": 8}}
    (out / "ranking" / "ranking.json").write_text(json.dumps(meta))
    cfg = load_config(synthetic_config, [f"output_dir={out / 'run'}", f"data.dir={data}",
                                         "ranking.single_task_baselines=false"], TrainConfig)
    (out / "run").mkdir()
    shutil.move(out / "ranking", out / "run" / "ranking")
    held_out = verify_bundle(synthetic_bundle)["metrics"]
    metrics = json.loads(json.dumps(held_out))
    metrics["retrieval"]["protocol"]["mf_weight"] = 1.5  # as if validation had chosen the MF dimensions
    source = run_refit(cfg, metrics, progress=False)
    return source, held_out, metrics, cfg, late


def test_refit_retrains_the_blended_trees_on_every_row(refitted):
    import onnx

    source, *_ = refitted
    meta = json.loads((source / "ranking" / "ranking.json").read_text())
    assert meta["hybrid"]["gbdt_rounds"] == {"click": 5} and meta["hybrid"]["baseline_rounds"] == {"click": 8}
    # the bundle keeps the GBDT as fitted (all 8 trees: the baseline a later log is judged against)
    assert lgb.Booster(model_file=str(source / "ranking" / meta["hybrid"]["gbdt_files"]["click"])).num_trees() == 8
    weight = dict(zip([h["name"] for h in meta["heads"]], meta["calibration"]["gbdt_weight"]))
    assert weight["click"] == 0.5 and not any(w for h, w in weight.items() if h != "click")
    for f in (meta["onnx"], meta["request_onnx"]):
        trees = [n for n in onnx.load(str(source / "ranking" / f)).graph.node if n.op_type == "TreeEnsemble"]
        assert len(trees) == 1 and len(next(a for a in trees[0].attribute if a.name == "tree_roots").ints) == 5
    assert meta["parity_max_scaled_diff"] < 1e-4


def test_refit_ships_the_held_out_mf_weight(refitted):
    source, _, metrics, *_ = refitted
    meta = json.loads((source / "retrieval" / "retrieval.json").read_text())
    d, f = meta["mf"]["dimensions"]
    assert meta["mf"]["weight"] == 1.5 and f > d and meta["embedding_dim"] == f + 1
    assert np.load(source / "retrieval" / "item_vectors.npy").shape[1] == f + 1
    assert metrics["refit"]["retrieval"]["mf_weight"] == 1.5


def test_refit_config_keeps_the_recipe_and_puts_every_row_in_train(synthetic_config: Path, tmp_path: Path):
    cfg = load_config(synthetic_config, [f"output_dir={tmp_path}", "split.train_block_hours=12"], TrainConfig)
    r = refit_config(cfg)
    assert r.split.mode == "all" and r.split.train_block_hours == 12
    assert Path(r.output_dir) == tmp_path / "refit"
    assert r.ranking == cfg.ranking and r.retrieval == cfg.retrieval and r.data == cfg.data
    assert cfg.split.mode != "all"  # the held-out recipe is untouched


def test_plans_take_the_best_epoch_and_the_calibration():
    plan = retrieval_plan({"training": {"best_epoch": 3}})
    assert plan.epochs == 4
    r = ranking_plan({"training": {"best_epoch": 0}}, {"calibration": {"scale": [1.5, 2.0], "bias": [0.1, -0.2]}})
    assert r.epochs == 1 and r.calibration == {"scale": [1.5, 2.0], "bias": [0.1, -0.2]}
    assert r.gbdt_rounds is None
    # a hybrid ranker: the blend weights and the blended heads' tree counts carry over
    h = ranking_plan({"training": {"best_epoch": 2}},
                     {"calibration": {"scale": [1.5, 2.0], "bias": [0.1, -0.2], "gbdt_weight": [0.4, 0.0]},
                      "hybrid": {"gbdt_rounds": {"click": 37}}})
    assert h.epochs == 3 and h.calibration["gbdt_weight"] == [0.4, 0.0] and h.gbdt_rounds == {"click": 37}
    assert h.gbdt_served is None
    # under a trees' budget: fit every tree the held-out GBDT had, serve the first ones it served
    cut = ranking_plan({"training": {"best_epoch": 2}},
                       {"calibration": {"scale": [1.0], "bias": [0.0], "gbdt_weight": [0.4]},
                        "hybrid": {"gbdt_rounds": {"click": 11}, "baseline_rounds": {"click": 68}}})
    assert cut.gbdt_rounds == {"click": 68} and cut.gbdt_served == {"click": 11}
    with pytest.raises(ValueError, match="recorded no 'best_epoch'"):
        retrieval_plan({"training": {}})


def test_refit_needs_both_held_out_stages(synthetic_config: Path, tmp_path: Path):
    cfg = load_config(synthetic_config, [f"output_dir={tmp_path}"], TrainConfig)
    with pytest.raises(ValueError, match="held-out ranking fit"):
        run_refit(cfg, {"retrieval": {"training": {"best_epoch": 0}}}, progress=False)


def test_refit_learns_the_held_out_days(refitted):
    source, held_out, metrics, cfg, late = refitted
    refit_tables = FeatureTables.load(source / "features")
    rows = refit_tables.manifest["rows"]
    assert rows["valid"] == rows["test"] == 0 and rows["train"] == metrics["refit"]["rows"]
    assert rows["train"] == refit_tables.manifest["validation"]["interactions"]["good_rows"]
    inter = pd.read_parquet(refit_tables.dir / "interactions.parquet", columns=["item_id", "item_id_idx"])
    inter["item_id"] = inter["item_id"].astype(int)
    assert late <= set(inter["item_id"])
    # Items first shown after the held-out train period get learned ids in the refit (a held-out fit's
    # vocabulary comes from its train period only, so they would be out of vocabulary there).
    assert (inter.loc[inter["item_id"].isin(late), "item_id_idx"] > 0).all()
    assert metrics["refit"]["ranking"]["training"]["train_samples"] == rows["train"] * metrics["refit"]["ranking"]["training"]["epochs"]


def test_refit_trains_the_chosen_epochs_with_the_held_out_calibration(refitted, synthetic_bundle: Path):
    source, held_out, metrics, cfg, _ = refitted
    assert metrics["refit"]["retrieval"]["training"]["epochs"] == held_out["retrieval"]["training"]["best_epoch"] + 1
    assert metrics["refit"]["ranking"]["training"]["epochs"] == held_out["ranking"]["training"]["best_epoch"] + 1
    held_meta = json.loads((Path(synthetic_bundle) / "ranking" / "ranking.json").read_text())
    refit_meta = json.loads((source / "ranking" / "ranking.json").read_text())
    assert refit_meta["calibration"]["scale"] == pytest.approx(held_meta["calibration"]["scale"])
    assert refit_meta["calibration"]["bias"] == pytest.approx(held_meta["calibration"]["bias"])
    assert refit_meta["refit"]["epochs"] == metrics["refit"]["ranking"]["training"]["epochs"]
    assert refit_meta["single_task"] == {}
    retrieval_meta = json.loads((source / "retrieval" / "retrieval.json").read_text())
    assert retrieval_meta["metrics"]["model"] == held_out["retrieval"]["model"]  # what is reported is held out
    assert 0.0 < retrieval_meta["index"]["recall@100_vs_exact"] <= 1.0


def test_refit_bundle_is_sound_and_serves_the_refit_models(refitted):
    source, held_out, metrics, cfg, _ = refitted
    bundle = assemble_bundle(cfg, metrics, source)
    manifest = verify_bundle(bundle)
    assert manifest["refit"] is True
    assert manifest["index_factory"] == cfg.retrieval.index_factory
    assert manifest["metrics"]["ranking"]["model"] == held_out["ranking"]["model"]
    for rel in ("retrieval/item_vectors.npy", "ranking/ranker.onnx", "features/vocab.json"):
        assert (bundle / rel).read_bytes() == (source / rel).read_bytes()
    vectors = np.load(bundle / "retrieval" / "item_vectors.npy")
    items = pd.read_parquet(bundle / "features" / "items.parquet")
    assert vectors.shape[0] == len(items) and np.isfinite(vectors).all()
    # Serving loads it (hybrid ranker graph with its trees, MF dimensions in the vectors) and recommends.
    from serving.bundle import load_bundle
    from serving.config import ServeSettings
    from serving.recommender import Recommender

    rec = Recommender(load_bundle(bundle), ServeSettings())
    user = str(pd.read_parquet(bundle / "features" / "users.parquet")["user_id"].iloc[0])
    page = rec.recommend(user, 10)
    assert len(page.items) == 10
    ranked = rec.rank(user, [it.item_id for it in page.items])
    assert len(ranked.items) == 10
