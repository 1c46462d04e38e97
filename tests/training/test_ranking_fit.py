"""Smoke fit of the ranking stage on the synthetic world, resume, and evaluation of a later log."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from features.config import load_config
from features.external import read_later_log
from features.tables import FeatureTables
from training.config import TrainConfig
from training.onnx_export import session
from training.ranking.evaluate import evaluate_ranking
from training.ranking.pipeline import fit_ranking

FAST = ["ranking.batch_size=512", "ranking.expert_hidden=[32,16]", "ranking.tower_hidden=8", "ranking.patience=5"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These machines are shared: with other jobs running, 2 OpenMP threads per process oversubscribe the
    cores and small-batch training slows down many times over. One thread keeps the tests fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(path: Path, *extra: str) -> TrainConfig:
    return load_config(path, FAST + list(extra), TrainConfig)


@pytest.fixture(scope="module")
def fitted(synthetic_config: Path, synthetic_tables: FeatureTables, tmp_path_factory) -> tuple[Path, dict, TrainConfig]:
    cfg = config(synthetic_config, "ranking.max_epochs=3", "ranking.single_task_max_epochs=1")
    bundle = tmp_path_factory.mktemp("bundle")
    report = fit_ranking(cfg, synthetic_tables, bundle / "ranking", progress=False)
    return bundle, report, cfg


def test_smoke_fit_learns_every_head(fitted):
    bundle, report, _ = fitted
    out = bundle / "ranking"
    for f in ("ranker.onnx", "ranking.json", "metrics.json", "per_head.md", "per_head.csv", "reliability.png",
              "checkpoints/last.ckpt", "single_task/click.onnx", "single_task/watch_time.onnx"):
        assert (out / f).exists(), f
    model = report["model"]
    # Every head with enough test positives ranks far better than chance; as a whole the model beats
    # the item-level smoothed rates it also sees as inputs (per head that can flip on 6k rows: hate
    # in this world is mostly an item-quality effect).
    for head, m in model.items():
        if m["positives"] >= 30:
            assert m["auc"] > 0.6, (head, m)
            assert m["gauc"] > 0.55, (head, m)
    assert report["summary"]["model_mean_auc"] > report["summary"]["item_rate_mean_auc"] + 0.02
    wt = report["watch_time"]
    assert wt["xauc"] > wt["baselines"]["duration_only"]["xauc"]
    for scenario in ("feed", "commerce"):
        f = report["fusion"][scenario]
        assert f["ndcg@20"] > f["random_ndcg@20"] + 0.05
    assert report["parity_max_abs_diff"] < 1e-4
    # The GBDT baseline on the same inputs, early-stopped on validation, in the same report.
    gbdt = report["baselines"]["gbdt"]
    assert set(gbdt) == {h for h in model if h != "watch_time"}
    for head, m in gbdt.items():
        if m["positives"] >= 30:
            assert m["auc"] > 0.6, (head, m)
    assert report["training"]["gbdt"]["samples_per_s"] > 0
    assert set(report["validation"]) == {"model", "single_task", "gbdt"}
    for head, m in model.items():  # rare heads carry a bootstrap interval and a verdict
        if 0 < m["positives"] < 300 and head in report["baselines"]["item_rate"]:
            lo, hi = m["auc_ci95"]
            assert lo <= m["auc"] <= hi and m["vs_item_rate"] in ("above", "below", "not distinguishable")
    assert json.loads((out / "metrics.json").read_text())["model"].keys() == model.keys()


def test_bundle_meta_describes_onnx_inputs(fitted, synthetic_tables: FeatureTables):
    bundle, _, _ = fitted
    meta = json.loads((bundle / "ranking" / "ranking.json").read_text())
    sess = session(bundle / "ranking" / meta["onnx"])
    assert [i.name for i in sess.get_inputs()] == [i["name"] for i in meta["inputs"]]
    assert [o.name for o in sess.get_outputs()] == [o["name"] for o in meta["outputs"]]
    for spec, inp in zip(meta["inputs"], sess.get_inputs()):
        assert inp.shape[1] == spec["shape"][1]
        assert len(spec.get("columns", [spec.get("column")])) in (1, spec["shape"][1])
    heads = [h["name"] for h in meta["heads"]]
    assert heads == meta["outputs"][0]["columns"]
    assert set(meta["scenarios"]) == {"feed", "commerce"}
    # Serving can find every numeric input in the feature tables it ships.
    items = synthetic_tables.items.columns
    beh = synthetic_tables.spec["behaviour"]["columns"]
    for col, src in zip(meta["inputs"][2]["columns"], meta["inputs"][2]["sources"]):
        table, _, name = src.partition(":")
        assert table in ("items", "fans", "users", "user_creator", "item_ctx", "creator_ctx"), (col, src)
        if table == "items":
            assert name in items, (col, src)
        elif table in ("item_ctx", "creator_ctx"):
            ctx, _, name = name.partition(":")
            assert name in beh[f"{table}:{ctx}"], (col, src)
        elif table == "user_creator":
            assert name in beh["pair"] and name in synthetic_tables.behaviour["user_creator"].columns


def test_resume_continues_from_last_checkpoint(synthetic_config: Path, synthetic_tables: FeatureTables, tmp_path: Path):
    base = ["ranking.single_task_baselines=false"]
    first = fit_ranking(config(synthetic_config, *base, "ranking.max_epochs=1"), synthetic_tables, tmp_path, progress=False)
    steps = first["training"]["global_step"]
    assert steps > 0 and first["training"]["resumed_from"] is None
    again = fit_ranking(config(synthetic_config, *base, "ranking.max_epochs=2"), synthetic_tables, tmp_path,
                        resume=True, progress=False)
    assert again["training"]["resumed_from"] == "last.ckpt"
    assert again["training"]["global_step"] == 2 * steps
    assert again["training"]["train_samples"] == first["training"]["train_samples"]  # only epoch 2 ran
    fresh = fit_ranking(config(synthetic_config, *base, "ranking.max_epochs=1"), synthetic_tables, tmp_path, progress=False)
    assert fresh["training"]["global_step"] == steps


def _later_rows(cfg: TrainConfig, synthetic_tables: FeatureTables, bundle: Path, tmp_path: Path):
    """The raw rows of the test period, written as a separate "later" log file and read back as one."""
    shutil.copytree(synthetic_tables.dir, bundle / "features", dirs_exist_ok=True)
    tables = FeatureTables.load(bundle / "features")
    raw = pd.read_csv(Path(cfg.data.dir) / cfg.data.interactions.file)
    ts_col = cfg.data.interactions.columns["ts"]
    later = tmp_path / "later.csv"
    raw[raw[ts_col] >= tables.manifest["time_ranges"]["test"][0]].to_csv(later, index=False)
    return read_later_log(cfg, later, tables)[0], tables


def test_evaluate_later_log(fitted, synthetic_tables: FeatureTables, tmp_path: Path):
    bundle, report, cfg = fitted
    rows, tables = _later_rows(cfg, synthetic_tables, bundle, tmp_path)
    got = evaluate_ranking(bundle, rows, tables, cfg)
    assert got["model"].keys() == report["model"].keys()
    trees = set(json.loads((bundle / "ranking" / "ranking.json").read_text()).get("hybrid", {}).get("gbdt_files", {}))
    assert set(got["baselines"]) == {"item_rate", "single_task"} | ({"gbdt"} if trees else set())
    assert got["summary"]["impressions"] == len(rows)
    # Snapshot features differ from the time-correct ones, so numbers move, but the model still ranks.
    assert got["summary"]["model_mean_auc"] > 0.65
    assert np.isfinite(got["watch_time"]["xauc"]) and got["watch_time"]["mae_ms"] > 0
    assert got["fusion"]["feed"]["ndcg@20"] > got["fusion"]["feed"]["random_ndcg@20"]


def test_eager_ranker_from_checkpoint_matches_the_shipped_onnx(fitted):
    """The benchmarks' eager model (checkpoint + ranking.json, calibration included) is what ranker.onnx runs."""
    from training.checkpoints import load_eager_ranker
    from training.onnx_export import check_parity
    from training.ranking.export import random_inputs

    bundle, _, _ = fitted
    out = bundle / "ranking"
    meta = json.loads((out / "ranking.json").read_text())
    scorer, layout, heads = load_eager_ranker(meta, out / "checkpoints" / "best.ckpt")
    assert heads == [h["name"] for h in meta["heads"]]
    make = random_inputs(layout, np.random.default_rng(0).normal(size=(64, len(layout.num_columns))).astype(np.float32), 3)
    report = check_parity(scorer, out / meta["onnx"], make)
    assert report.ok(1e-4), report.describe()
    # Without the stored calibration (and blend) the same weights give other probabilities.
    base = getattr(scorer, "graph", scorer)  # a hybrid ranker wraps the scorer with its trees
    base.calib_scale.fill_(1.0)
    base.calib_bias.fill_(0.0)
    base.gbdt_weight.fill_(0.0)
    assert not check_parity(scorer, out / meta["onnx"], make).ok(1e-4)


def test_hybrid_ranker_ships_its_trees_in_the_graph(synthetic_config: Path, synthetic_tables: FeatureTables,
                                                    tmp_path: Path):
    """Forced onto every binary head (min gain -1, no minimum of positives), the blend's trees sit inside both served graphs, which
    keep the ranker's inputs; the eager deep model + saved LightGBM models reproduce them, and without the
    trees' weight they would not."""
    import onnx

    from training.checkpoints import load_eager_ranker
    from training.onnx_export import check_parity
    from training.ranking.export import random_inputs

    cfg = config(synthetic_config, "ranking.max_epochs=1", "ranking.single_task_baselines=false",
                 "ranking.hybrid_min_gain=-1", "ranking.hybrid_min_positives=0")
    report = fit_ranking(cfg, synthetic_tables, tmp_path, progress=False)
    meta = json.loads((tmp_path / "ranking.json").read_text())
    names = [h["name"] for h in meta["heads"]]
    binary = [h["name"] for h in meta["heads"] if h["kind"] == "binary"]
    assert set(report["hybrid"]) == set(binary)  # every head was offered the blend
    # used unless the fit gave the deep logit a non-positive weight (a rare head can)
    used = {h for h, b in report["hybrid"].items() if b["used"]}
    assert used == set(meta["hybrid"]["gbdt_rounds"]) and {"click", "long_view"} <= used
    weight = dict(zip(names, meta["calibration"]["gbdt_weight"]))
    assert all((weight[h] != 0) == (h in used) for h in names) and weight["watch_time"] == 0
    for f in (meta["onnx"], meta["request_onnx"]):
        graph = onnx.load(str(tmp_path / f)).graph
        assert [i.name for i in graph.input] == ["cat", "hist", "num"]
        assert sum(n.op_type == "TreeEnsemble" for n in graph.node) == len(used)  # one node per used head
    assert report["parity_max_scaled_diff"] < 1e-4
    assert {"gbdt", "deep", "item_rate"} <= set(report["baselines"])
    scorer, layout, _ = load_eager_ranker(meta, tmp_path / "checkpoints" / "best.ckpt")
    make = random_inputs(layout, np.random.default_rng(0).normal(size=(64, len(layout.num_columns))).astype(np.float32), 5)
    assert check_parity(scorer, tmp_path / meta["onnx"], make).ok(1e-4)
    scorer.graph.gbdt_weight.fill_(0.0)
    assert not check_parity(scorer, tmp_path / meta["onnx"], make).ok(1e-4)
    # A later log is judged against the bundle's own trees too: the plain GBDT of each head that has them.
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "ranking").symlink_to(tmp_path)
    rows, tables = _later_rows(cfg, synthetic_tables, bundle, bundle)
    got = evaluate_ranking(bundle, rows, tables, cfg)
    assert set(got["baselines"]["gbdt"]) == used
    for h in used:
        g, m = got["baselines"]["gbdt"][h], got["model"][h]
        assert m["vs_gbdt"]["auc_diff"] == pytest.approx(m["auc"] - g["auc"], abs=1e-9)
    for h in ("click", "long_view"):  # the trees rank on their own, and are not the blend
        assert got["baselines"]["gbdt"][h]["auc"] > 0.6
        assert got["baselines"]["gbdt"][h]["auc"] != got["model"][h]["auc"]


def test_hybrid_max_trees_caps_the_served_trees_not_the_baseline(synthetic_config: Path,
                                                                  synthetic_tables: FeatureTables, tmp_path: Path):
    """``ranking.hybrid_max_trees``: the served graph holds at most that many trees in all, each blended head's
    count the one chosen on validation; the GBDT baseline keeps every tree it fitted, in the bundle too, so a
    later log is judged against the GBDT as fitted, not the cut trees."""
    import lightgbm as lgb
    import onnx

    cfg = config(synthetic_config, "ranking.max_epochs=1", "ranking.single_task_baselines=false",
                 "ranking.hybrid_min_gain=-1", "ranking.hybrid_min_positives=0", "ranking.hybrid_max_trees=6")
    report = fit_ranking(cfg, synthetic_tables, tmp_path, progress=False)
    meta = json.loads((tmp_path / "ranking.json").read_text())
    served = meta["hybrid"]["gbdt_rounds"]
    assert meta["hybrid"]["max_trees"] == 6 and served and sum(served.values()) <= 6
    assert sum(report["training"]["gbdt"]["rounds"].values()) > 6  # the baseline kept its trees
    chosen = report["hybrid_budget"]["chosen"]
    assert all(chosen[h] == n for h, n in served.items())
    assert {h: b["used"] for h, b in report["hybrid"].items() if h in chosen} == {h: h in served for h in chosen}
    trees = {}
    for node in onnx.load(str(tmp_path / meta["onnx"])).graph.node:
        if node.op_type == "TreeEnsemble":
            trees[node.name] = len(next(a for a in node.attribute if a.name == "tree_roots").ints)
    assert sorted(trees.values()) == sorted(served.values())
    assert report["parity_max_scaled_diff"] < 1e-4
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "ranking").symlink_to(tmp_path)
    fitted = report["training"]["gbdt"]["rounds"]
    assert meta["hybrid"]["baseline_rounds"] == {h: fitted[h] for h in served}
    assert any(fitted[h] > n for h, n in served.items())
    for h, rel in meta["hybrid"]["gbdt_files"].items():
        assert lgb.Booster(model_file=str(tmp_path / rel)).num_trees() == fitted[h]
    rows, tables = _later_rows(cfg, synthetic_tables, bundle, bundle)
    later = evaluate_ranking(bundle, rows, tables, cfg)
    assert set(later["baselines"]["gbdt"]) == set(served)
