"""Console tables: the ranker beside whichever baselines the run trained."""

from __future__ import annotations

from training.report import ranking_table


def _section(with_gbdt: bool) -> dict:
    model = {"click": {"positives": 900, "auc": 0.71, "gauc": 0.61, "logloss": 0.6, "ece": 0.01},
             "hate": {"positives": 20, "auc": 0.64, "auc_ci95": [0.45, 0.76], "vs_item_rate": "not distinguishable",
                      "gauc": 0.5, "logloss": 0.01, "ece": 0.001}}
    base = {"item_rate": {"click": {"auc": 0.66}, "hate": {"auc": 0.57}}}
    if with_gbdt:
        base["gbdt"] = {"click": {"auc": 0.73, "gauc": 0.62}, "hate": {"auc": 0.75, "gauc": 0.4}}
    return {"model": model, "baselines": base}


def test_gbdt_column_only_when_the_run_has_it():
    with_gbdt = ranking_table(_section(True)).splitlines()
    assert "AUC GBDT" in with_gbdt[0] and "GAUC GBDT" in with_gbdt[0]
    click = [c.strip() for c in with_gbdt[2].strip("|").split("|")]
    header = [c.strip() for c in with_gbdt[0].strip("|").split("|")]
    assert click[header.index("AUC GBDT")] == "0.7300" and click[header.index("AUC item-rate")] == "0.6600"
    assert "GBDT" not in ranking_table(_section(False)).splitlines()[0]


def test_rare_heads_show_their_interval_and_verdict():
    hate = ranking_table(_section(True)).splitlines()[3]
    assert "0.6400 [0.450, 0.760] n.d." in hate
    click = ranking_table(_section(True)).splitlines()[2]
    assert "[" not in click and "n.d." not in click


def test_difference_to_the_gbdt_with_its_paired_interval():
    section = _section(True)
    section["model"]["click"]["vs_gbdt"] = {"auc_diff": -0.02, "ci95": [-0.031, -0.009], "verdict": "below"}
    lines = ranking_table(section).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    click = [c.strip() for c in lines[2].strip("|").split("|")]
    assert click[header.index("AUC - GBDT [paired 95% CI]")] == "-0.0200 [-0.0310, -0.0090]"
    assert "AUC - GBDT" not in ranking_table(_section(True)).splitlines()[0]  # absent when not computed
