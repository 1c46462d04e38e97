"""``python -m evaluation channels``: the served feed by candidate source (:mod:`serving.offline_channels`),
the merged candidates against each channel alone, on a bundle's own held-out period or a later log.

    python -m evaluation channels --bundle runs/full/heldout-bundle [--period valid|test | --log LATER.csv]
        [--max-users N] --out channels.json [--plot channels.png]

For the bundle's own period the bundle is served *as of the period's start* (:mod:`evaluation.as_of`). A
later log is served from the bundle as it is.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.common import add_common_arguments, read_log, served_settings
from features.config import ConfigError
from evaluation.as_of import as_of
from features.candidates import CHANNELS
from serving.offline_channels import SERVED, feed_scores, served_minus


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_common_arguments(ap, "channels_eval.json")
    ap.add_argument("--plot", default=None, help="bar chart PNG (default: beside --out)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--mix", dest="mixes", action="append", default=[], metavar="NAME:CHANNEL=N[,CHANNEL=N]",
                    help="extra arm with these channel quotas, e.g. 'cov100:ann=300,mf=100,covisit=100' (repeatable)")


def parse_mixes(specs: list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for spec in specs:
        name, sep, body = spec.partition(":")
        pairs = [p.strip().partition("=") for p in body.split(",") if p.strip()]
        if not sep or not name or not pairs or any(not eq or not v.strip().isdigit() for _, eq, v in pairs):
            raise ConfigError(f"--mix {spec!r}: expected NAME:CHANNEL=N[,CHANNEL=N...], e.g. cov100:ann=400,covisit=100")
        out[name] = {c.strip(): int(v) for c, _, v in pairs}
    return out


def table(result: dict[str, Any]) -> str:
    k, gains = result["k"], result["gains"]
    cols = [f"{m}@{k}_{g}" for g in gains for m in ("ndcg", "recall")]
    cols.append("creator_gini_catalogue")
    lines = ["| candidates | quotas | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for a, m in result["arms"].items():
        quotas = ", ".join(f"{c} {q}" for c, q in m["quotas"].items() if q)
        lines.append(f"| {a} | {quotas} | " + " | ".join("" if m.get(c) is None else f"{m[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> str:
    v = result.get("served_vs_best_single")
    if not v:
        return "served vs best single channel: no user with a positive"
    lines = [_versus(v, f"the best single channel ({v['channel']})")]
    w = result.get("served_vs_validation_single")
    if w:
        lines.append(_versus(w, f"the single channel that led validation ({w['channel']}, "
                                f"{w['valid_metric']} {w['valid']:.4f} there)"))
    return "\n".join(lines)


def _versus(v: dict[str, Any], what: str) -> str:
    lo, hi = v["ci95"]
    word = "above" if lo > 0 else "below" if hi < 0 else "not distinguishable from"
    return (f"served feed {v['metric']} minus {what}: {v['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}] "
            f"(paired user bootstrap): {word} it")


def versus_validation_single(metrics: dict[str, Any], result: dict[str, Any], per_user: dict[str, np.ndarray],
                             seed: int = 0) -> dict[str, Any] | None:
    """The served arm minus the single channel that served the best page on validation (the bundle's
    ``retrieval.channels.page_choice``, written by ``choose-channels``), on this log's users. The best single
    channel *of this log* (``served_vs_best_single``) is picked on the numbers it is compared with, so among
    channels that tie it lands above the served arm more often than not; a channel picked on validation is
    the alternative one could actually have served. None without a recorded choice."""
    choice = metrics.get("retrieval", {}).get("channels", {}).get("page_choice")
    if not choice:
        return None
    metric = choice["metric"]
    valid = {a: m[metric] for a, m in choice["arms"].items() if a in CHANNELS and m.get(metric) is not None}
    if not valid:
        return None
    pick = max(valid, key=lambda a: valid[a])
    diff = served_minus(per_user, pick, seed)
    if diff is None:
        return None
    return {"channel": pick, "metric": result["served_vs_best_single"]["metric"], "valid_metric": metric,
            "valid": float(valid[pick]), **diff}


def bar_plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, gains = result["k"], result["gains"]
    arms = list(result["arms"])
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    width = 0.8 / len(gains)
    for j, g in enumerate(gains):
        vals = [result["arms"][a][f"ndcg@{k}_{g}"] or 0.0 for a in arms]
        ax.bar(np.arange(len(arms)) + (j - (len(gains) - 1) / 2) * width, vals, width, label=f"NDCG@{k} {g}",
               color=[("tab:blue", "tab:orange", "tab:green")[j % 3]] * len(arms),
               edgecolor=["black" if a == SERVED else "none" for a in arms])
    long = len(arms) > 6 or max(len(a) for a in arms) > 12  # mix names like ann350+covisit150+mf100
    ax.set_xticks(np.arange(len(arms)), [a.replace("_", " ") for a in arms], rotation=30 if long else 0,
                  ha="right" if long else "center", fontsize=7 if long else None)
    ax.set_ylabel(f"NDCG@{k} of the served page")
    period = result["data"].get("period") or "later log"
    ax.set_title(f"Served feed by candidate source, {period}: {result['users']} users", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    from serving.bundle import load_bundle
    from serving.offline_cases import own_period

    mixes = parse_mixes(args.mixes)
    bundle_dir = Path(args.bundle)
    bundle = load_bundle(bundle_dir, onnx_threads=2)
    settings = served_settings(args.policy_config, bundle)
    if args.log:
        log, report = read_log(args, bundle)
        view, data = bundle, {"source": args.log, "period": None, "later_log_report": report}
    else:
        log, view, data = own_period(bundle, args.period, as_of)
    result, per_user = feed_scores(view, settings, log, args.k, args.scenario, args.max_users,
                                   progress=not args.no_progress, mixes=mixes)
    if "served_vs_best_single" in result:
        picked = versus_validation_single(bundle.manifest.metrics, result, per_user)
        if picked:
            result["served_vs_validation_single"] = picked
    result["data"].update(data)
    result["bundle"] = {"path": str(bundle_dir), "version": bundle.version, "git_revision": bundle.manifest.git_revision}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot = bar_plot(result, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(table(result))
    print(verdict(result))
    if not args.no_mlflow:
        _log_mlflow(result, out, plot)
    print(f"wrote {out} and {plot}")
    return 0


def _log_mlflow(result: dict[str, Any], out: Path, plot: Path) -> None:
    import mlflow

    from training.tracking import mlflow_run

    params = {"k": result["k"], "period": result["data"]["period"], "source": result["data"]["source"],
              "bundle": result["bundle"], "candidates": result["candidates"]}
    with mlflow_run("evaluate-channels", params, tags={"kind": "channel-eval"}):
        for arm, m in result["arms"].items():
            mlflow.log_metrics({f"{arm}.{key.replace('@', '_at_')}": float(v) for key, v in m.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for name in ("served_vs_best_single", "served_vs_validation_single"):
            v = result.get(name)
            if v:
                mlflow.log_metrics({f"{name}.difference": v["difference"], f"{name}.ci95_low": v["ci95"][0],
                                    f"{name}.ci95_high": v["ci95"][1]})
        mlflow.log_artifact(str(out))
        mlflow.log_artifact(str(plot))
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "channels_table.md"
            p.write_text(table(result) + "\n\n" + verdict(result) + "\n")
            mlflow.log_artifact(str(p))
