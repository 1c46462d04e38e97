"""``python -m evaluation choose-channels``: choose the page's retrieval weight and the served candidate
quotas by the page the user gets.

    python -m evaluation choose-channels --config configs/kuairand.yaml [--set key=value ...]
        [--max-users N] [--top N] [--k 20] [--retrieval-weights 0,1,2,4,8,16,32,64,128] [--dry-run] [--no-mlflow]
        [--policy-config YAML  (with --dry-run: serve that YAML's serving / policy sections, not the bundle's recipe)]

First the weight of the retrieval score in the page's fusion (``policy.fusion.retrieval_weight``; unless the
config sets it): each weight is served with the bundle's quotas. Then the quotas, every arm served at the
chosen weight. Either changes only when its best arm beats the bundle's current setting with evidence (the
paired user-bootstrap interval of the difference above 0, at the Bonferroni level for the arms compared: the
leader is the best of many, see :func:`choose`).

Training chooses the quota mix by Recall@K of the merged set on validation (``retrieval.valid.channel_sweep``):
what the ranker *could* pick. What the user gets is the page the ranker and the feed policy build from it, and
the two disagree (on the shipped sample the best-recall mix served a page below co-visitation alone). This
step serves a shortlist of mixes on the validation period through the service's own request path
(:func:`serving.offline_channels.feed_scores`, the held-out bundle as of the period's start) and keeps the
one with the best NDCG@k of the primary gain (by the rule above). The shortlist: the mix training chose, each channel alone, the
``--top`` best mixes by validation recall, and for each channel the best-recall mix that gives it its largest
share. Every arm is served with ``serving.fill_from_ann`` as configured, so a channel that finds little for
a user is topped up from the ANN.

Each arm also reports the Gini of creator exposure over the catalogue on its pages (the feed policy runs in
every arm): the retrieval weight that wins NDCG also decides how far the policy's exposure boost reaches
(docs/policy_eval.md), and the choice does not look at it, so it is printed where the choice is made.

The choice is written into the bundles of ``output_dir`` (``retrieval.json`` channels and
``page_retrieval_weight``, re-checksummed by
:func:`features.bundle.amend_channel_quotas`; the held-out bundle and the served one), recorded in
``metrics.json`` and the manifests as ``retrieval.channels.page_choice``, and the served bundle is registered
as a new model version (its alias moves under the same gates as the fit's). ``serving.channel_quotas`` in the
config fixes the quotas by hand: then there is nothing to choose.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.channels import bar_plot
from evaluation.common import served_settings
from features.cli_common import add_config_args, user_count
from features.config import ConfigError, load_config
from features.contract import BUNDLE_DIR, HELDOUT_BUNDLE_DIR, MANIFEST
from features.metrics import paired_difference

INCUMBENT = "served"  # serving.offline_channels' arm for the bundle's own quotas (training's recall choice)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_config_args(ap)
    ap.add_argument("--k", type=int, default=20, help="page length the NDCG is taken at")
    ap.add_argument("--max-users", type=user_count, default=2000,
                    help="the first N validation users with a positive (time order); 0 = all")
    ap.add_argument("--top", type=int, default=3, help="best mixes by validation Recall@K added to the shortlist")
    ap.add_argument("--retrieval-weights", default="0,1,2,4,8,16,32,64,128",
                    help="weights of the retrieval score in the page's fusion to try (policy.fusion.retrieval_weight; "
                         "comma-separated); the config's value, when set, is kept instead")
    ap.add_argument("--scenario", default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the choice, change no bundle")
    ap.add_argument("--policy-config", default=None,
                    help="YAML whose serving: / policy: sections are served instead of the bundle's recipe, e.g. to "
                         "see what a policy change does to the choice (with --dry-run only: a bundle serves its own recipe)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-mlflow", action="store_true", help="no MLflow run and no new registered version")


def mix_name(quotas: dict[str, int]) -> str:
    return "+".join(f"{c}{q}" for c, q in quotas.items() if q > 0)


def shortlist(sweep: dict[str, Any] | None, top: int) -> dict[str, dict[str, int]]:
    """Named quota mixes from training's validation channel sweep (``retrieval.valid.channel_sweep``): the
    ``top`` best by Recall@K, then for each channel the best mix that gives it its largest quota."""
    if not sweep or not sweep.get("merged"):
        return {}
    key = f"recall@{sweep['k']}"
    merged = sorted(sweep["merged"], key=lambda r: -r[key])
    picked = [r["quotas"] for r in merged[:top]]
    channels = sorted({c for r in merged for c in r["quotas"] if c != "ann"})
    for c in channels:
        most = max(r["quotas"].get(c, 0) for r in merged)
        if most > 0:
            picked.append(next(r["quotas"] for r in merged if r["quotas"].get(c, 0) == most))
    out: dict[str, dict[str, int]] = {}
    for q in picked:
        out.setdefault(mix_name(q), {c: int(v) for c, v in q.items() if v > 0})
    return out


def weight_arms(settings: Any, quotas: dict[str, int], weights: list[float],
                incumbent_weight: float) -> dict[str, Any]:
    """Arm name -> serving settings: the incumbent weight (the bundle's, as ``INCUMBENT``) and each other weight
    tried, all with ``quotas`` (the incumbent's weight is not served twice)."""
    import dataclasses

    from serving.config import ServeSettings
    from serving.offline_channels import with_retrieval_weight

    fixed = ServeSettings(dataclasses.replace(settings.serving, channel_quotas=dict(quotas)), settings.policy)
    arms = {INCUMBENT: fixed}
    for w in weights:
        if w != incumbent_weight:
            arms[f"retrieval_weight_{w:g}"] = with_retrieval_weight(fixed, w)
    return arms


def choose(result: dict[str, Any], per_user: dict[str, np.ndarray], seed: int = 0,
           family_level: float = 0.95) -> dict[str, Any]:
    """The arm with the best mean NDCG@k of the primary gain, if it beats the incumbent with evidence;
    otherwise the incumbent stays. The page metric is noisy at validation sizes (which channel leads flips
    between periods), and an arm that is not distinguishable from what serves now is no reason to change it.

    Evidence: the paired user-bootstrap interval of the leader minus the incumbent lies above 0, at the
    Bonferroni level for the arms compared (``1 - (1 - family_level) / m`` for m challengers). The leader is
    the best of m: with ten tied arms, the best one's 95% interval clears 0 far more often than one time in
    forty, and the sample's quota choice switched on such a leader (+0.0027 [+0.0001, +0.0053], ten arms)."""
    k, primary = result["k"], result["gains"][0]
    metric = f"ndcg@{k}_{primary}"
    values = {a: m[metric] if m[metric] is not None else -1.0 for a, m in result["arms"].items()}
    best = max(values, key=lambda a: (values[a], a == INCUMBENT))
    defined = np.isfinite(per_user[INCUMBENT])
    challengers = max(len(values) - 1, 1)
    level = 1.0 - (1.0 - family_level) / challengers
    diff = None
    if defined.any():
        # Enough resamples that the interval's tails (each (1 - level) / 2) hold at least ~25 of them.
        samples = max(1000, int(np.ceil(50 / (1.0 - level))))
        d = paired_difference(per_user[best][defined], per_user[INCUMBENT][defined], seed, samples, level)
        diff = {"difference": d["difference"], "ci": d["ci95"], "level": level, "comparisons": challengers}
    leader = best
    if best != INCUMBENT and (diff is None or not diff["ci"][0] > 0):
        best = INCUMBENT
    return {"metric": metric, "period": "valid", "users": int(defined.sum()), "chosen": best, "leader": leader,
            "leader_minus_incumbent": diff,
            "quotas": result["arms"][best]["quotas"], "incumbent": result["arms"][INCUMBENT]["quotas"],
            "retrieval_weight": result["arms"][best].get("retrieval_weight"),
            "chosen_minus_incumbent": diff if best != INCUMBENT else None,
            "arms": {a: {"quotas": m["quotas"], "retrieval_weight": m.get("retrieval_weight"), metric: m[metric],
                         "creator_gini_catalogue": m.get("creator_gini_catalogue")}
                     for a, m in result["arms"].items()}}


def table(choice: dict[str, Any]) -> str:
    metric = choice["metric"]
    lines = [f"| arm | quotas | retrieval weight | {metric} (valid) | creator Gini |", "|---|---|---|---|---|"]
    for a, m in sorted(choice["arms"].items(), key=lambda x: -(x[1][metric] or 0.0)):
        quotas = ", ".join(f"{c} {q}" for c, q in m["quotas"].items() if q)
        mark = "**" if a == choice["chosen"] else ""
        value = "" if m[metric] is None else f"{m[metric]:.4f}"
        w = m.get("retrieval_weight")
        g = m.get("creator_gini_catalogue")
        lines.append(f"| {mark}{a}{mark} | {quotas} | {'' if w is None else f'{w:g}'} | {mark}{value}{mark} | "
                     f"{'' if g is None else f'{g:.3f}'} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from evaluation.as_of import as_of
    from serving.bundle import load_bundle
    from serving.offline_cases import own_period
    from serving.offline_channels import channel_arms, feed_scores, page_scores, with_retrieval_weight
    from training.config import TrainConfig

    check_args(args)
    weights = parse_weights(args.retrieval_weights)
    cfg = load_config(args.config, args.overrides, TrainConfig)
    out = Path(cfg.output_dir)
    served_dir = out / BUNDLE_DIR
    held_dir = out / HELDOUT_BUNDLE_DIR if (out / HELDOUT_BUNDLE_DIR).is_dir() else served_dir
    if not held_dir.is_dir():
        raise FileNotFoundError(f"no bundle in {out}: run `python -m training fit` with this config first")
    bundle = load_bundle(held_dir, onnx_threads=2)
    settings = served_settings(args.policy_config, bundle)
    if settings.serving.channel_quotas:
        print(f"serving.channel_quotas is set in the config ({settings.serving.channel_quotas}): nothing to choose")
        return 0
    if bundle.channels is None:
        print(f"{held_dir} has no channel tables: it serves the ANN alone, nothing to choose")
        return 0
    sweep = bundle.manifest.metrics.get("retrieval", {}).get("valid", {}).get("channel_sweep")
    incumbent = {c: q for c, q in (bundle.channel_quotas or {}).items() if q > 0}
    log, view, _ = own_period(bundle, "valid", as_of)
    users = args.max_users
    # First the retrieval score's weight in the page's fusion, with the bundle's quotas; then the quotas, served
    # with the chosen weight.
    weight_choice = None
    if settings.policy.fusion.retrieval_weight is None and weights:
        served = channel_arms(view, settings)[INCUMBENT]
        arms = weight_arms(settings, served, weights, view.page_retrieval_weight)
        wres, wper = page_scores(view, arms, log, args.k, args.scenario, users,
                                 progress=not args.no_progress)
        weight_choice = choose(wres, wper, cfg.seed)
        weight_choice["seconds"] = wres["seconds"]
        print(table(weight_choice))
        settings = with_retrieval_weight(settings, float(weight_choice["retrieval_weight"]))
    # One channel alone and the bundle's own mix are arms already (serving.offline_channels.channel_arms).
    mixes = {n: q for n, q in shortlist(sweep, args.top).items() if len(q) > 1 and q != incumbent}
    result, per_user = feed_scores(view, settings, log, args.k, args.scenario, users,
                                   cfg.seed, progress=not args.no_progress, mixes=mixes)
    choice = choose(result, per_user, cfg.seed)
    choice["seconds"] = result["seconds"]
    if weight_choice is not None:
        choice["retrieval_weight_choice"] = weight_choice
    result["data"]["period"] = "valid"
    # A dry run leaves the plot of the choice the bundles serve alone.
    plot = bar_plot(result, out / ("channel_choice_dry_run.png" if args.dry_run else "channel_choice.png"))
    print(table(choice))
    print(f"plot: {plot}")
    for what, c in (("retrieval weight", weight_choice), ("quotas", choice)):
        d = c["leader_minus_incumbent"] if c else None
        if d and c["leader"] != INCUMBENT:
            verdict = ("switched to it" if c["chosen"] != INCUMBENT
                       else "not distinguishable: the bundle's keeps serving")
            print(f"{what}: best arm {c['leader']} minus the bundle's ({INCUMBENT}): {d['difference']:+.4f} "
                  f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] ({d['level']:.1%} interval: Bonferroni over "
                  f"{d['comparisons']} arms) {c['metric']} on {c['users']} validation users; "
                  f"{verdict}")
    if args.dry_run:
        return 0
    bundles = [held_dir] + ([served_dir] if served_dir != held_dir and served_dir.is_dir() else [])
    _apply(choice, bundles)
    metrics_path = out / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        _record(metrics, choice)
        metrics_path.write_text(json.dumps(metrics, indent=2))
    print(f"channel quotas {mix_name(choice['quotas'])} written into {', '.join(map(str, bundles))}")
    if not args.no_mlflow and served_dir.is_dir():
        _log_and_register(cfg, served_dir, choice, plot)
    return 0


def _record(metrics: dict[str, Any], choice: dict[str, Any]) -> None:
    metrics.setdefault("retrieval", {}).setdefault("channels", {})["page_choice"] = choice


def _apply(choice: dict[str, Any], bundles: list[Path]) -> None:
    from features.bundle import amend_channel_quotas, verify_bundle

    by = f"{choice['metric']} of the served page on valid ({choice['users']} users), evaluation choose-channels"
    verified = [verify_bundle(b) for b in bundles]  # all sound before any is changed: no half-applied choice
    for b, manifest in zip(bundles, verified):
        amend_channel_quotas(b, choice["quotas"], by, lambda m: _record(m, choice), verified=manifest,
                             retrieval_weight=(choice["retrieval_weight_choice"]["retrieval_weight"]
                                               if "retrieval_weight_choice" in choice else None))


def _log_and_register(cfg: Any, bundle: Path, choice: dict[str, Any], plot: Path) -> None:
    import mlflow

    from features.config import to_dict
    from training.bundle import log_and_register
    from training.tracking import mlflow_run, setup_mlflow

    metrics = json.loads((bundle / MANIFEST).read_text())["metrics"]  # just written by the amendment
    setup_mlflow(cfg.tracking.experiment)
    with mlflow_run("choose-channels", to_dict(cfg), tags={"kind": "channel-choice"}):
        arms = choice["arms"]
        # MLflow metric names allow no '+' or '@'.
        mlflow.log_metrics({f"{a.replace('+', '-')}.{choice['metric'].replace('@', '_at_')}": float(m[choice["metric"]])
                            for a, m in arms.items() if m[choice["metric"]] is not None})
        mlflow.log_dict(choice, "channel_choice.json")
        mlflow.log_artifact(str(plot))
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "channel_choice.md"
            p.write_text(table(choice) + "\n")
            mlflow.log_artifact(str(p))
        reg = log_and_register(cfg, bundle, metrics)
    if reg.version is not None:
        alias = (f"alias '{cfg.tracking.alias}' -> version {reg.version}" if reg.alias_moved
                 else "alias not moved (failed gates)")
        print(f"registered '{cfg.tracking.registered_model}' version {reg.version} with the chosen quotas; {alias}")


def parse_weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError as e:
        raise ConfigError(f"--retrieval-weights: comma-separated numbers, got '{text}'") from e
    if any(not np.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"--retrieval-weights must be finite and >= 0, got '{text}'")
    return weights


def check_args(args: argparse.Namespace) -> None:
    if args.k <= 0 or args.top < 0:
        raise ConfigError("--k must be > 0 and --top >= 0")
    if args.policy_config and not args.dry_run:
        raise ConfigError("--policy-config needs --dry-run: the choice is written into bundles that serve their own "
                          "recipe's policy, so it must be made with that policy (refit with the new config instead)")
