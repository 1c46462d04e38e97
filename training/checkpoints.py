"""Lightning checkpoints back into plain modules (benchmarks compare eager PyTorch with the shipped ONNX)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def model_state(ckpt: Path, prefix: str = "model.") -> dict[str, Any]:
    """The wrapped model's state dict from a Lightning checkpoint (the task keeps its model under ``prefix``)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def load_eager_ranker(meta: dict[str, Any], ckpt: Path, ranking_dir: Path | None = None):
    """(scorer, layout, heads): the ranker of a ranking stage as an eval-mode module taking (cat, hist, num),
    built from its ``ranking.json`` (``meta``) and a checkpoint, calibration included, and for a hybrid
    ranker the saved LightGBM models beside it (``ranking_dir``, default the checkpoint's grandparent): what
    ``ranker.onnx`` computes."""
    from training.ranking.data import FeatureLayout
    from training.ranking.model import Ranker, RankerScorer, RankerSpec
    from training.ranking.watch_time import WatchTimeQuantiles

    layout = FeatureLayout.from_json(meta["layout"])
    ranker = Ranker(RankerSpec(**meta["model"]))
    ranker.load_state_dict(model_state(ckpt))
    heads = [h["name"] for h in meta["heads"]]
    watch = heads.index("watch_time") if "watch_time" in heads else None
    wtq = WatchTimeQuantiles.from_json(meta["watch_time"]) if meta.get("watch_time") else None
    scorer = RankerScorer(ranker, watch, wtq, layout.duration_position).eval()
    calib = meta.get("calibration") or {}
    for key, buf in (("scale", scorer.calib_scale), ("bias", scorer.calib_bias), ("gbdt_weight", scorer.gbdt_weight)):
        if key in calib:
            buf.copy_(torch.tensor(calib[key]))
    hybrid = meta.get("hybrid") or {}
    if hybrid.get("gbdt_files"):
        from training.ranking.gbdt import WithTrees, load_boosters

        where = Path(ranking_dir) if ranking_dir is not None else Path(ckpt).parent.parent
        return WithTrees(scorer, load_boosters(where, hybrid["gbdt_files"], hybrid["gbdt_rounds"]), heads), layout, heads
    return scorer, layout, heads
