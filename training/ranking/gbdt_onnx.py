"""LightGBM boosters as ONNX ``TreeEnsemble`` nodes (ai.onnx.ml opset 5), spliced into the ranker's graph.

The hybrid ranker adds each head's GBDT margin to the deep model's logit inside one ONNX graph, so serving
runs one session with the same ``cat`` / ``hist`` / ``num`` inputs. The trees read
``concat(float(cat), num)``, exactly :func:`training.ranking.gbdt.gbdt_matrix`.

LightGBM's decisions, reproduced node by node (``include/LightGBM/tree.h``):

- numerical ``x <= threshold`` goes left. Missing values: with ``missing_type`` NaN a NaN follows
  ``default_left``; with None a NaN is read as 0. Thresholds are doubles and inputs float32, so each threshold
  becomes the largest float32 not above it (the same comparison for every float32 input);
- categorical: the integer value in the split's category set goes left; NaN and negatives go right. ONNX's
  ``BRANCH_MEMBER`` is that test, so category sets need no chains of equality nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ML_DOMAIN = "ai.onnx.ml"
ML_OPSET = 5
_LEQ, _MEMBER = 0, 6  # TreeEnsemble node modes


@dataclass
class _Ensemble:
    roots: list[int] = field(default_factory=list)
    modes: list[int] = field(default_factory=list)
    features: list[int] = field(default_factory=list)
    splits: list[float] = field(default_factory=list)
    true_ids: list[int] = field(default_factory=list)
    true_leaf: list[int] = field(default_factory=list)
    false_ids: list[int] = field(default_factory=list)
    false_leaf: list[int] = field(default_factory=list)
    missing_true: list[int] = field(default_factory=list)
    members: list[float] = field(default_factory=list)
    leaf_targets: list[int] = field(default_factory=list)
    leaf_weights: list[float] = field(default_factory=list)

    def leaf(self, value: float, target: int) -> int:
        self.leaf_targets.append(target)
        self.leaf_weights.append(float(value))
        return len(self.leaf_weights) - 1

    def node(self) -> int:
        for lst in (self.modes, self.features, self.splits, self.true_ids, self.true_leaf, self.false_ids,
                    self.false_leaf, self.missing_true):
            lst.append(0)
        return len(self.modes) - 1


def _float32_floor(x: float) -> float:
    """The largest float32 <= x: for float32 inputs, ``v <= result`` exactly when ``v <= x``."""
    big = float(np.finfo(np.float32).max)
    if x >= big:  # LightGBM writes huge thresholds for "everything left"
        return float("inf")
    f = np.float32(max(x, -big))
    if float(f) > x:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def _categories(threshold: Any) -> list[float]:
    return [float(int(c)) for c in str(threshold).split("||") if c != ""]


def _add_tree(ens: _Ensemble, tree: dict[str, Any], target: int) -> None:
    if "split_index" not in tree:  # a single leaf: one node whose both branches reach it
        n = ens.node()
        leaf = ens.leaf(tree["leaf_value"], target)
        ens.modes[n], ens.splits[n] = _LEQ, 0.0
        ens.true_ids[n] = ens.false_ids[n] = leaf
        ens.true_leaf[n] = ens.false_leaf[n] = 1
        ens.roots.append(n)
        return
    ens.roots.append(len(ens.modes))
    stack: list[tuple[dict[str, Any], int | None, bool]] = [(tree, None, True)]
    while stack:
        node, parent, is_true = stack.pop()
        if "split_index" in node:
            n = ens.node()
            ens.features[n] = int(node["split_feature"])
            if node["decision_type"] == "==":
                ens.modes[n] = _MEMBER
                ens.members += _categories(node["threshold"]) + [float("nan")]
                ens.missing_true[n] = 0
            elif node["decision_type"] == "<=":
                thr = float(node["threshold"])
                ens.modes[n], ens.splits[n] = _LEQ, _float32_floor(thr)
                missing = node.get("missing_type", "None")
                if missing == "NaN":
                    ens.missing_true[n] = int(bool(node["default_left"]))
                elif missing == "None":
                    ens.missing_true[n] = int(0.0 <= thr)
                else:  # "Zero": zeros and NaN take the default branch; matches a plain test only if they agree
                    if bool(node["default_left"]) != (0.0 <= thr):
                        raise ValueError("a LightGBM split treats zero as missing against its threshold; "
                                         "train with zero_as_missing=false")
                    ens.missing_true[n] = int(bool(node["default_left"]))
            else:
                raise ValueError(f"unsupported LightGBM decision type {node['decision_type']!r}")
            ref, leaf_flag = n, 0
            # children are linked when they are created: push right first so left is numbered first
            stack.append((node["right_child"], n, False))
            stack.append((node["left_child"], n, True))
        else:
            ref, leaf_flag = ens.leaf(node["leaf_value"], target), 1
        if parent is not None:
            if is_true:
                ens.true_ids[parent], ens.true_leaf[parent] = ref, leaf_flag
            else:
                ens.false_ids[parent], ens.false_leaf[parent] = ref, leaf_flag


def tree_ensemble_node(boosters: dict[int, Any], n_targets: int, rounds: dict[int, int], input_name: str,
                       output_name: str, name: str = "gbdt_trees"):
    """One ``TreeEnsemble`` node: output column ``t`` is booster ``t``'s raw margin over its first
    ``rounds[t]`` trees (columns without a booster are 0)."""
    from onnx import helper, numpy_helper

    ens = _Ensemble()
    for target, booster in sorted(boosters.items()):
        dump = booster.dump_model(num_iteration=rounds.get(target) or None)
        for info in dump["tree_info"]:
            _add_tree(ens, info["tree_structure"], target)
    if not ens.roots:  # no booster: a constant-0 tree keeps the node valid
        _add_tree(ens, {"leaf_value": 0.0}, 0)
    return helper.make_node(
        "TreeEnsemble", [input_name], [output_name], domain=ML_DOMAIN, name=name,
        aggregate_function=1, post_transform=0, n_targets=n_targets, tree_roots=ens.roots,
        nodes_modes=numpy_helper.from_array(np.array(ens.modes, np.uint8), "nodes_modes"),
        nodes_featureids=ens.features,
        nodes_splits=numpy_helper.from_array(np.array(ens.splits, np.float32), "nodes_splits"),
        nodes_truenodeids=ens.true_ids, nodes_trueleafs=ens.true_leaf,
        nodes_falsenodeids=ens.false_ids, nodes_falseleafs=ens.false_leaf,
        nodes_missing_value_tracks_true=ens.missing_true,
        membership_values=numpy_helper.from_array(np.array(ens.members or [np.nan], np.float32), "membership_values"),
        leaf_targetids=ens.leaf_targets,
        leaf_weights=numpy_helper.from_array(np.array(ens.leaf_weights, np.float32), "leaf_weights"),
    )


def splice_trees(path: Path, boosters: dict[int, Any], rounds: dict[int, int], n_targets: int,
                 margin_input: str = "gbdt_margin", cat_input: str = "cat", num_input: str = "num") -> int:
    """Replace the graph input ``margin_input`` (N, n_targets) of the ONNX model at ``path`` by the trees'
    margins over ``concat(float(cat), num)``; rewrites the file, returns the number of trees.

    Each booster is its own single-target ``TreeEnsemble`` node: ONNX Runtime sums a single target's leaves
    on a faster path than one multi-target node's (0.76x the time for the served ranker's 323 trees,
    bench/bench_trees.py). A 0/1 placement matrix puts the booster columns at their targets (exact: every
    product is the margin times 1 or a finite margin times 0)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    if margin_input not in [i.name for i in g.input]:
        raise ValueError(f"{path} has no input {margin_input!r} to feed the trees into")
    kept = [i for i in g.input if i.name != margin_input]
    del g.input[:]
    g.input.extend(kept)
    nodes = [
        helper.make_node("Cast", [cat_input], ["gbdt_cat_f"], to=TensorProto.FLOAT, name="gbdt_cast"),
        helper.make_node("Concat", ["gbdt_cat_f", num_input], ["gbdt_x"], axis=1, name="gbdt_concat"),
    ]
    targets = sorted(boosters)
    if not targets:  # no booster: one constant-0 tree keeps the margin input fed
        nodes.append(tree_ensemble_node({}, n_targets, {}, "gbdt_x", margin_input))
    else:
        columns = []
        for t in targets:
            columns.append(f"gbdt_margin_{t}")
            nodes.append(tree_ensemble_node({0: boosters[t]}, 1, {0: rounds.get(t, 0)}, "gbdt_x", columns[-1],
                                            name=f"gbdt_trees_{t}"))
        place = np.zeros((len(targets), n_targets), np.float32)
        place[np.arange(len(targets)), targets] = 1.0
        g.initializer.append(numpy_helper.from_array(place, "gbdt_placement"))
        nodes += [helper.make_node("Concat", columns, ["gbdt_columns"], axis=1, name="gbdt_columns"),
                  helper.make_node("MatMul", ["gbdt_columns", "gbdt_placement"], [margin_input], name="gbdt_place")]
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)
    if not any(o.domain == ML_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ML_DOMAIN, ML_OPSET))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return sum(len(next(a for a in n.attribute if a.name == "tree_roots").ints)
               for n in nodes if n.op_type == "TreeEnsemble" and boosters)
