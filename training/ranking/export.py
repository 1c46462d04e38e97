"""ONNX export of the ranker's two graphs (the scorer and the request-shaped serving graph) with the
GBDT trees of blended heads spliced in, each checked against the eager model on random inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from features.contract import RANKER_ONNX, RANKER_REQUEST_ONNX, CatInput, HistInput, NumInput
from training.onnx_export import ParityReport, RandomInputs, check_parity, export_onnx
from training.ranking.data import FeatureLayout
from training.ranking.gbdt import GbdtResult, WithTrees
from training.ranking.gbdt_onnx import splice_trees
from training.ranking.model import RankerScorer, RequestScorer
from training.ranking.prepared import RankingData


def export_checked(scorer: RankerScorer, data: RankingData, path: Path, seed: int, graph: torch.nn.Module | None = None,
            shape=None, trees: GbdtResult | None = None) -> ParityReport:
    """Export ``graph`` (default: the scorer itself) with a dynamic batch and check it against the eager
    scorer on fresh random inputs (passed through ``shape``, e.g. :func:`request_shaped`, when given).
    With ``trees`` (the hybrid ranker) the GBDT margins become a tree ensemble inside the same graph."""
    example = {k: torch.from_numpy(v[:4]) for k, v in data.inputs["train"].items()}
    heads = scorer.ranker.spec.heads
    if trees is not None:
        example["gbdt_margin"] = torch.zeros((4, len(heads)), dtype=torch.float32)
    export_onnx(graph if graph is not None else scorer, example, path, scorer.output_names)
    reference: torch.nn.Module = scorer
    if trees is not None:
        index = {h: t for t, h in enumerate(heads)}
        splice_trees(path, {index[h]: b for h, b in trees.boosters.items()},
                     {index[h]: r for h, r in trees.rounds.items()}, len(heads))
        reference = WithTrees(scorer, trees, heads)
    make = random_inputs(data.layout, data.inputs["train"]["num"], seed)
    return check_parity(reference, path, shape(make) if shape else make)


def request_shaped(make, const_cat: list[int], const_num: list[int]):
    """``make`` turned into one request's inputs: every row carries row 0's shared columns and history."""

    def request(b: int) -> dict[str, torch.Tensor]:
        x = make(b)
        x["cat"][:, const_cat] = x["cat"][:1, const_cat]
        x["num"][:, const_num] = x["num"][:1, const_num]
        x["hist"][:] = x["hist"][:1]
        return x

    return request


def random_inputs(layout: FeatureLayout, num_reference: np.ndarray, seed: int):
    """Fresh inputs in each column's valid range (numeric: resampled train values, 2% NaN)."""
    rnd = RandomInputs(seed + 1)

    def make(b: int) -> dict[str, torch.Tensor]:
        return {"cat": rnd.codes(layout.cat_sizes, b),
                "hist": rnd.history(layout.cat_sizes[layout.item_position], layout.history_length, b),
                "num": rnd.resampled(num_reference, b, nan_share=0.02)}

    return make


def blended_trees(scorer: RankerScorer, gbdt: GbdtResult | None) -> GbdtResult | None:
    """The GBDT reduced to the heads the scorer blends in (None: a deep-only graph)."""
    if gbdt is None:
        return None
    heads = scorer.ranker.spec.heads
    used = {h for t, h in enumerate(heads) if float(scorer.gbdt_weight[t]) != 0.0 and h in gbdt.boosters}
    if not used:
        return None
    return GbdtResult({h: b for h, b in gbdt.boosters.items() if h in used},
                      {h: r for h, r in gbdt.rounds.items() if h in used}, {}, gbdt.fit_seconds, gbdt.samples_per_s,
                      gbdt.feature_names,
                      {h: r for h, r in gbdt.baseline_rounds.items() if h in used} if gbdt.baseline_rounds else None)


def input_specs(data: RankingData) -> tuple[CatInput, HistInput, NumInput]:
    """The ranker's three inputs as ``ranking.json`` describes them to serving."""
    layout = data.layout
    log1p = [c for c, m in zip(layout.num_columns, data.num_stats["log_mask"]) if m > 0]
    return (CatInput("cat", "int64", ["batch", len(layout.cat_columns)], layout.cat_columns, layout.cat_vocabs,
                     layout.cat_sources, oov=0),
            HistInput("hist", "int64", ["batch", layout.history_length], layout.history_column, layout.history_vocab,
                      padding=0, source="users:history"),
            NumInput("num", "float32", ["batch", len(layout.num_columns)], layout.num_columns, layout.num_sources,
                     missing="NaN (the model uses the train mean)", log1p=log1p))


@dataclass
class ExportedGraphs:
    parity: ParityReport  # ranker.onnx against the eager scorer
    request_parity: ParityReport  # ranker_request.onnx against the eager scorer on request-shaped inputs
    const_cat: list[int]  # the request-constant input columns the serving graph computes once
    const_num: list[int]


def export_graphs(scorer: RankerScorer, data: RankingData, out_dir: Path, seed: int, trees: GbdtResult | None,
                  tolerance: float) -> ExportedGraphs:
    """Both served graphs: the scorer, and the same model with one request's shared columns computed once
    (:class:`RequestScorer`); a graph whose parity fails raises instead of shipping."""
    parity = export_checked(scorer, data, out_dir / RANKER_ONNX, seed, trees=trees)
    const_cat, const_num = data.layout.request_constant()
    request_parity = export_checked(scorer, data, out_dir / RANKER_REQUEST_ONNX, seed + 1,
                                    RequestScorer(scorer, const_cat, const_num).eval(),
                                    lambda make: request_shaped(make, const_cat, const_num), trees=trees)
    return ExportedGraphs(parity.require("ranker", tolerance), request_parity.require("request ranker", tolerance),
                          const_cat, const_num)
