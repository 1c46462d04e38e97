"""Plain-text (Markdown) tables of a metrics dict, for the console, the README and MLflow."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def retrieval_table(section: dict[str, Any]) -> str:
    mf = (section.get("protocol") or {}).get("mf_weight") or 0
    models = {"two-tower + MF" if mf > 0 else "two-tower": section.get("model", {}), **section.get("baselines", {})}
    keys = list(section.get("model", {}))
    return table(["model", *keys], [[name, *(m.get(k) for k in keys)] for name, m in models.items()])


def channels_table(ch: dict[str, Any]) -> str:
    """Recall@K of each candidate channel alone and of the quota merge the ranker sees."""
    k = ch.get("k", "K")
    rows = [[name, "", v] for name, v in ch.get("single", {}).items()]
    quotas = ", ".join(f"{n} {q}" for n, q in ch.get("quotas", {}).items())
    rows.append(["merged", quotas, ch.get("merged")])
    out = table(["candidates", "quotas", f"Recall@{k}"], rows)
    vs = ch.get("merged_vs_best_single")
    if vs:
        out += (f"\nmerged - {vs['channel']} (the best single channel): {vs['difference']:+.4f} "
                f"[{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}] (paired user bootstrap, 95%)")
    return out


def vs_gbdt_text(g: dict[str, Any] | None) -> str:
    """A head's AUC difference to the GBDT with its paired interval: "+0.0017 [+0.0006, +0.0027]"."""
    return f"{g['auc_diff']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]" if g else ""


def ranking_table(section: dict[str, Any]) -> str:
    """Per head: the ranker beside the GBDT, its own deep part alone (a hybrid ranker), single-task and
    item-rate baselines (when the run has them);
    rare heads carry their bootstrap interval and whether they beat item-rate distinguishably; the difference
    to the GBDT carries its paired user-bootstrap interval."""
    model = section.get("model", {})
    base = section.get("baselines", {})
    extra = [b for b in ("gbdt", "deep", "single_task") if base.get(b)]
    has_vs = any(isinstance(m, dict) and "vs_gbdt" in m for m in model.values())
    rows = []
    for head, m in model.items():
        if not isinstance(m, dict):
            continue
        ci = m.get("auc_ci95")
        auc = _fmt(m.get("auc")) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        if m.get("vs_item_rate") == "not distinguishable":
            auc += " n.d."
        vs = vs_gbdt_text(m.get("vs_gbdt")) or None
        rows.append([head, m.get("positives"), auc, *(base[b].get(head, {}).get("auc") for b in extra),
                     *([vs] if has_vs else []), base.get("item_rate", {}).get(head, {}).get("auc"), m.get("gauc"),
                     *(base[b].get(head, {}).get("gauc") for b in extra), m.get("logloss"), m.get("ece")])
    names = {"gbdt": "GBDT", "deep": "deep part", "single_task": "single-task"}
    header = ["head", "positives", "AUC", *(f"AUC {names[b]}" for b in extra),
              *(["AUC - GBDT [paired 95% CI]"] if has_vs else []), "AUC item-rate", "GAUC",
              *(f"GAUC {names[b]}" for b in extra), "logloss", "ECE"]
    return table(header, rows)


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    if "retrieval" in metrics:
        r = metrics["retrieval"]
        parts.append(f"retrieval ({r.get('test_users', '?')} test users)\n" + retrieval_table(r))
        if "channels" in r:
            parts.append("candidate channels (test period, seen items removed)\n" + channels_table(r["channels"]))
    if "ranking" in metrics:
        r = metrics["ranking"]
        parts.append("ranking\n" + ranking_table(r))
        if "watch_time" in r:
            parts.append("watch time: " + ", ".join(f"{k}={_fmt(v)}" for k, v in r["watch_time"].items()))
        if "fusion" in r:
            parts.append("fusion: " + ", ".join(f"{s}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in m.items())
                                                for s, m in r["fusion"].items()))
    return "\n\n".join(parts)
