"""What the ranking stage writes beside the bundle: the per-head table, the reliability plot, MLflow."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.report import vs_gbdt_text
from training.tracking import log_to_run, metric_tree


def per_head_table(report: dict[str, Any]) -> pd.DataFrame:
    rows = []
    bases = [("single_task", "single_task"), ("item_rate", "item_rate"), ("gbdt", "gbdt"), ("deep", "deep")]
    for head, m in report["model"].items():
        row: dict[str, Any] = {"head": head, "positives": m["positives"], "impressions": m["impressions"]}
        for metric in ("auc", "gauc", "logloss"):
            row[metric] = m[metric]
            for key, label in bases:
                row[f"{metric}_{label}"] = report["baselines"].get(key, {}).get(head, {}).get(metric)
        ci = m.get("auc_ci95")
        row["auc_ci95"] = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        row["vs_item_rate"] = m.get("vs_item_rate", "")
        g = m.get("vs_gbdt")
        row["vs_gbdt"] = f"{vs_gbdt_text(g)} {g['verdict']}" if g else ""
        row["ece"], row["ece_quantile"] = m["ece"], m["ece_quantile"]
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    fmt = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def reliability_plot(rows: pd.DataFrame, heads: list[tuple[str, str]], scores: np.ndarray, path: Path, bins: int) -> None:
    """Observed rate vs mean prediction per equal-mass bin, one panel per binary head (log axes: rare
    heads live near 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.ranking.metrics import calibration_bins

    binary = [(t, n) for t, (n, k) in enumerate(heads) if k == "binary"]
    ncol = 4
    nrow = math.ceil(len(binary) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.6 * nrow), squeeze=False)
    for ax in axes.flat[len(binary):]:
        ax.axis("off")
    for ax, (t, name) in zip(axes.flat, binary):
        tab = calibration_bins(rows[name].to_numpy(), scores[:, t], bins, "quantile")
        lo = max(min(tab["pred"].min(), tab["rate"][tab["rate"] > 0].min() if (tab["rate"] > 0).any() else 1), 1e-5)
        ax.plot([lo, 1], [lo, 1], color="grey", lw=0.8, ls="--")
        ax.plot(tab["pred"], tab["rate"].clip(lower=lo / 2), marker="o", ms=3)
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.set_title(f"{name} (n+={int(rows[name].sum())})", fontsize=9)
        ax.set_xlabel("mean prediction", fontsize=8); ax.set_ylabel("observed rate", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def log_mlflow(report: dict[str, Any], out_dir: Path, files: list[Path], prefix: str = "ranking") -> None:
    log_to_run(metric_tree(report, prefix))
    for f in files:
        log_to_run({}, [f], prefix if f.parent == out_dir else f"{prefix}/{f.parent.name}")


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x
