"""The hybrid ranker's trees in ONNX Runtime: graph layouts timed against each other (a benchmark, not a test).

Loads a fitted ranking stage's LightGBM boosters (``<output_dir>/ranking/gbdt``, the served round counts)
and one user's real candidates, and times on one thread, in interleaved rounds:

- ``one_node``: every booster in one multi-target ``TreeEnsemble`` node (the layout before per-booster nodes);
- ``per_booster``: what ``splice_trees`` builds now, one single-target node per booster and a placement MatMul;
- ``lightgbm``: LightGBM's own ``predict`` (raw margins, one thread), for scale.

Both ONNX layouts must give LightGBM's margins (max abs diff printed).

    python bench/bench_trees.py --ranking-dir runs/full/ranking --features runs/full/features

Prints a one-line JSON summary last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_ranker import one_user_candidates, time_it  # noqa: E402
from features.tables import FeatureTables  # noqa: E402
from training.onnx_export import session  # noqa: E402
from training.ranking.data import FeatureLayout  # noqa: E402
from training.ranking.gbdt import load_boosters  # noqa: E402
from training.ranking.gbdt_onnx import ML_DOMAIN, ML_OPSET, splice_trees, tree_ensemble_node  # noqa: E402


def margin_graph(path: Path, n_cat: int, n_num: int, n_targets: int, trees=None) -> Path:
    """cat, num -> margins: the trees' output as the graph output (``trees``: one prebuilt node),
    or, without ``trees``, a graph whose ``gbdt_margin`` input ``splice_trees`` replaces."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("cat", TensorProto.INT64, [None, n_cat]),
              helper.make_tensor_value_info("num", TensorProto.FLOAT, [None, n_num])]
    if trees is None:
        inputs.append(helper.make_tensor_value_info("gbdt_margin", TensorProto.FLOAT, [None, n_targets]))
        nodes = []
    else:
        nodes = [helper.make_node("Cast", ["cat"], ["gbdt_cat_f"], to=TensorProto.FLOAT),
                 helper.make_node("Concat", ["gbdt_cat_f", "num"], ["gbdt_x"], axis=1), trees]
    nodes.append(helper.make_node("Identity", ["gbdt_margin"], ["out"]))
    g = helper.make_graph(nodes, "trees", inputs,
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, n_targets])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                  helper.make_opsetid(ML_DOMAIN, ML_OPSET)]), str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranking-dir", default="runs/full/ranking")
    ap.add_argument("--features", default=None, help="default: <ranking-dir>/../features")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rdir = Path(args.ranking_dir)
    meta = json.loads((rdir / "ranking.json").read_text())
    hybrid = meta.get("hybrid") or {}
    if not hybrid.get("gbdt_files"):
        sys.exit(f"{rdir} holds no hybrid trees (ranking.hybrid was off)")
    heads = [h["name"] for h in meta["heads"]]
    tables = FeatureTables.load(args.features or rdir.parent / "features")
    layout = FeatureLayout.from_tables(tables)
    feed = one_user_candidates(layout, tables, args.candidates, args.seed)
    trees = load_boosters(rdir, hybrid["gbdt_files"], hybrid["gbdt_rounds"])
    index = {h: t for t, h in enumerate(heads)}
    boosters = {index[h]: b for h, b in trees.boosters.items()}
    rounds = {index[h]: r for h, r in trees.rounds.items()}
    n_cat, n_num, n_t = feed["cat"].shape[1], feed["num"].shape[1], len(heads)
    inputs = {"cat": feed["cat"], "num": feed["num"]}
    x = np.concatenate([feed["cat"].astype(np.float32), feed["num"]], axis=1)
    reference = np.zeros((len(x), n_t), np.float64)
    for t, b in boosters.items():
        reference[:, t] = b.predict(x, num_iteration=rounds.get(t) or None, raw_score=True, num_threads=1)

    with tempfile.TemporaryDirectory() as tmp:
        one = session(margin_graph(Path(tmp) / "one.onnx", n_cat, n_num, n_t,
                                   tree_ensemble_node(boosters, n_t, rounds, "gbdt_x", "gbdt_margin")), threads=1)
        split_path = margin_graph(Path(tmp) / "split.onnx", n_cat, n_num, n_t)
        n_trees = splice_trees(split_path, boosters, rounds, n_t)
        split = session(split_path, threads=1)
        diffs = {name: float(np.max(np.abs(s.run(None, inputs)[0] - reference))) for name, s in
                 (("one_node", one), ("per_booster", split))}

        def lgbm() -> None:
            for t, b in boosters.items():
                b.predict(x, num_iteration=rounds.get(t) or None, raw_score=True, num_threads=1)

        ms: dict[str, list[float]] = {"one_node": [], "per_booster": [], "lightgbm": []}
        for _ in range(3):  # interleaved, so drift in machine load hits every layout alike
            ms["one_node"] += time_it(lambda: one.run(None, inputs), args.reps // 3)
            ms["per_booster"] += time_it(lambda: split.run(None, inputs), args.reps // 3)
            ms["lightgbm"] += time_it(lgbm, max(args.reps // 30, 5), warmup=2)

    med = {k: statistics.median(v) for k, v in ms.items()}
    print(json.dumps({
        "bench": "trees", "ranking_dir": str(rdir), "candidates": args.candidates, "threads": 1, "trees": n_trees,
        "rounds": hybrid["gbdt_rounds"],
        **{f"{k}_median_ms": round(v, 3) for k, v in med.items()},
        "per_booster_vs_one_node": round(med["per_booster"] / med["one_node"], 3),
        "max_abs_diff_to_lightgbm": diffs,
    }))


if __name__ == "__main__":
    main()
