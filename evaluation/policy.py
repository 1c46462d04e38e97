"""``python -m evaluation policy`` (also ``python -m training evaluate-policy``): the offline feed-policy evaluation of :mod:`serving.offline`, with
the later log read through the bundle's dataset config, a Lorenz plot, and an MLflow run.

    python -m evaluation policy --bundle runs/full/heldout-bundle [--period valid|test | --log LATER.csv]
        [--policy-config configs/kuairand.yaml] [--strengths 0.5,2] --out policy.json [--plot docs/policy_lorenz.png]

The protocol (candidates, time order, period view, metric definitions) is in ``serving.offline``'s
docstring; this module only wires inputs and outputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from typing import Any

from evaluation.as_of import as_of
from evaluation.common import add_common_arguments, read_log, served_settings
from features.config import ConfigError, apply_overrides, to_dict
from serving.offline import BASELINE, POLICY, evaluate_policy
from serving.policy_config import PolicyConfig, load_policy


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_common_arguments(ap, "policy_eval.json")
    ap.add_argument("--plot", default=None, help="Lorenz curve PNG (default: beside --out)")
    ap.add_argument("--strengths", default=None,
                    help="extra arms: the policy with exposure.strength scaled by each value (comma-separated)")
    ap.add_argument("--arm", dest="arms", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="extra arm: the evaluated policy with these policy.* overrides, e.g. "
                         "'slots5:exposure.candidate_slots=5' (repeatable; arms share retrieval and ranking)")


def strength_arms(policy: PolicyConfig, strengths: list[float]) -> dict[str, PolicyConfig]:
    """The policy with its exposure strength (base and every scenario) multiplied by each factor."""
    raw = {k: v for k, v in to_dict(policy).items() if not k.startswith("_")}
    arms = {}
    for f in strengths:
        r = copy.deepcopy(raw)
        r["exposure"]["strength"] = r["exposure"]["strength"] * f
        for o in r["scenarios"].values():
            if "exposure" in o and "strength" in o["exposure"]:
                o["exposure"]["strength"] *= f
        arms[f"policy_x{f:g}"] = load_policy(r)
    return arms


def override_arms(policy: PolicyConfig, specs: list[str]) -> dict[str, PolicyConfig]:
    """``NAME:KEY=VALUE[,KEY=VALUE...]`` -> the policy with those ``policy.``-relative overrides, by name."""
    raw = {k: v for k, v in to_dict(policy).items() if not k.startswith("_")}
    arms = {}
    for spec in specs:
        name, sep, body = spec.partition(":")
        pairs = [p.strip() for p in body.split(",") if p.strip()]
        if not sep or not name or not pairs or any("=" not in p for p in pairs):
            raise ConfigError(f"--arm {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...], "
                              "e.g. slots5:exposure.candidate_slots=5")
        if name in (BASELINE, POLICY) or name in arms:
            raise ConfigError(f"--arm {spec!r}: the arm name '{name}' is already taken")
        arms[name] = load_policy(apply_overrides(copy.deepcopy(raw), pairs))
    return arms


def _figure(width: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, 4.4), dpi=100)


def _finish(fig: Any, ax: Any, title: str, legend_loc: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc=legend_loc)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def lorenz_plot(result: dict[str, Any], path: Path) -> Path:
    arms = [a for a in result if isinstance(result[a], dict) and "lorenz" in result[a]]
    fig, ax = _figure(4.8)
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="equality")
    for arm in arms:
        curve = result[arm]["lorenz"]
        q = [i / (len(curve) - 1) for i in range(len(curve))]
        ax.plot(q, curve, lw=1.8 if arm in (BASELINE, POLICY) else 0.9,
                label=f"{arm.replace('_', ' ')} (Gini {result[arm]['creator_gini']:.3f})")
    ax.set_xlabel("share of creators (least exposed first)")
    ax.set_ylabel("share of page slots")
    period = result["data"].get("period") or "later log"
    return _finish(fig, ax, f"Creator exposure, {period}: {result['users']} users, k={result['k']}", "upper left", path)


def tradeoff_plot(result: dict[str, Any], path: Path) -> Path:
    """Every arm's creator-Gini change against its NDCG change (judged and DM, primary gain), one point each."""
    k, primary = result["k"], result["gains"][0]
    rel = result["relative_to_engagement_only"]
    bar = result["bar"]
    fig, ax = _figure(6.0)
    ax.axhline(-bar["ndcg_loss_at_most"] * 100, color="tab:red", lw=0.8, ls="--", label="bar: -3% NDCG")
    ax.axvline(-bar["gini_reduction_at_least"] * 100, color="tab:green", lw=0.8, ls="--", label="bar: -25% Gini")
    for kind, marker, color in (("dm", "o", "tab:blue"), ("judged", "s", "tab:orange")):
        xs = [100 * r["creator_gini"] for r in rel.values()]
        ys = [100 * (r[f"ndcg_{kind}@{k}_{primary}"] or 0.0) for r in rel.values()]
        ax.scatter(xs, ys, marker=marker, color=color, s=22,
                   label={"dm": "NDCG, direct method (all slots)", "judged": "NDCG, judged (real signals only)"}[kind])
        if kind == "dm":
            for name, x, y in zip(rel, xs, ys):
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    ax.fill_betweenx([-bar["ndcg_loss_at_most"] * 100, y1], x0, -bar["gini_reduction_at_least"] * 100,
                     color="tab:green", alpha=0.08, label="both halves of the bar met")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("creator exposure Gini vs engagement-only (%)")
    ax.set_ylabel(f"NDCG@{k} {primary} vs engagement-only (%)")
    period = result["data"].get("period") or "later log"
    return _finish(fig, ax, f"Fairness / engagement trade-off, {period}: {result['users']} users", "lower left", path)


def table(result: dict[str, Any]) -> str:
    k, gains = result["k"], result["gains"]
    arms = [a for a in result if isinstance(result[a], dict) and "creator_gini" in result[a]]
    cols = [*(f"ndcg_{kind}@{k}_{g}" for kind in ("judged", "dm") for g in gains), f"ndcg_union@{k}_{gains[0]}",
            "creator_gini", "creator_gini_catalogue", "item_coverage", "creator_coverage", "quality_share",
            "fan_delivery", "governance_leaks"]
    lines = ["| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for a in arms:
        lines.append(f"| {a} | " + " | ".join(str(result[a][c]) for c in cols) + " |")
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> str:
    """One line per arm: its creator Gini and NDCG (judged, dm) against engagement-only, and the bar."""
    k, primary = result["k"], result["gains"][0]
    bar = result["bar"]
    base = result["engagement_only"]["creator_gini"]
    lines = []
    for arm, rel in result["relative_to_engagement_only"].items():
        ok = {kind: rel[f"passes_bar_{kind}"] for kind in ("judged", "dm")}
        lines.append(
            f"{arm}: creator Gini {base:.3f} -> {result[arm]['creator_gini']:.3f} ({100 * rel['creator_gini']:+.1f}%), "
            f"NDCG@{k} {primary} judged {100 * (rel[f'ndcg_judged@{k}_{primary}'] or 0.0):+.2f}%, "
            f"dm {100 * (rel[f'ndcg_dm@{k}_{primary}'] or 0.0):+.2f}%, leaks {result[arm]['governance_leaks']}; "
            f"bar (Gini -{100 * bar['gini_reduction_at_least']:.0f}%, NDCG loss <= {100 * bar['ndcg_loss_at_most']:.0f}% "
            f"on every gain): judged {'met' if ok['judged'] else 'not met'}, dm {'met' if ok['dm'] else 'not met'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from serving.bundle import load_bundle

    bundle_dir = Path(args.bundle)
    bundle = load_bundle(bundle_dir, onnx_threads=2)
    settings = served_settings(args.policy_config, bundle)
    extra = strength_arms(settings.policy, [float(s) for s in args.strengths.split(",")]) if args.strengths else {}
    extra.update(override_arms(settings.policy, args.arms))
    log, source = None, None
    if args.log:
        log, report = read_log(args, bundle)
        source = args.log
    result = evaluate_policy(bundle, settings, args.k, log=log, period=args.period, scenario=args.scenario,
                             max_users=args.max_users, extra=extra, source=source, retrieval_as_of=as_of)
    if args.log:
        result["data"]["later_log_report"] = report
    result["bundle"] = {"path": str(bundle_dir), "version": bundle.version, "git_revision": bundle.manifest.git_revision}
    result["policy_config"] = {k: v for k, v in to_dict(settings.policy).items() if not k.startswith("_")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot = lorenz_plot(result, Path(args.plot) if args.plot else out.with_name(out.stem + "_lorenz.png"))
    trade = tradeoff_plot(result, plot.with_name(plot.stem.replace("_lorenz", "") + "_tradeoff.png"))
    print(table(result))
    print(verdict(result))
    if not args.no_mlflow:
        _log_mlflow(result, out, plot, trade)
    print(f"wrote {out}, {plot} and {trade}")
    return 0


def _log_mlflow(result: dict[str, Any], out: Path, *plots: Path) -> None:
    import mlflow

    from training.tracking import mlflow_run

    params = {"k": result["k"], "period": result["data"]["period"], "source": result["data"]["source"],
              "bundle": result["bundle"], "scenario": result["scenario"], "policy": result["policy_config"]}
    with mlflow_run("evaluate-policy", params, tags={"kind": "policy-eval"}):
        for arm, m in result.items():
            if not (isinstance(m, dict) and "creator_gini" in m):
                continue
            mlflow.log_metrics({f"{arm}.{key.replace('@', '_at_')}": float(v) for key, v in m.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for arm, r in result["relative_to_engagement_only"].items():
            mlflow.log_metrics({f"{arm}.rel.{key.replace('@', '_at_')}": float(v) for key, v in r.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_artifact(str(out))
        for plot in plots:
            mlflow.log_artifact(str(plot))
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "policy_table.md"
            p.write_text(table(result) + "\n")
            mlflow.log_artifact(str(p))
