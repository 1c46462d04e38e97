"""The served feed by candidate source: the bundle as of the period start knows nothing of the period, every
arm serves through the service's own request path, the page metrics are what a plain loop computes, and
the CLI writes its JSON, plot and MLflow run."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evaluation.as_of import as_of
from features.bundle import amend_channel_quotas
from features.candidates import build_channel_tables
from features.metrics import ndcg
from serving.bundle import Bundle, load_bundle
from serving.config import ServeSettings, ServingConfig
from serving.exposure import gini
from serving.offline_cases import period_log, period_view
from serving.offline_channels import SERVED, channel_arms, feed_scores, page_scores, with_retrieval_weight
from serving.recommender import Recommender

K = 10
USERS = 25


@pytest.fixture(scope="module")
def bundle(synthetic_bundle: Path) -> Bundle:
    return load_bundle(synthetic_bundle)


@pytest.fixture(scope="module")
def test_log(bundle: Bundle) -> pd.DataFrame:
    return period_log(bundle, "test")


@pytest.fixture(scope="module")
def view(bundle: Bundle, test_log: pd.DataFrame) -> Bundle:
    v, _ = period_view(bundle, test_log)
    return as_of(bundle, v, int(test_log["ts"].min()))[0]


def _all_rows(bundle: Bundle) -> pd.DataFrame:
    return pd.read_parquet(bundle.path / "features" / "interactions.parquet", columns=["user_id", "item_id", "ts"])


def test_as_of_view_knows_nothing_of_the_period(bundle: Bundle, view: Bundle, test_log: pd.DataFrame, tmp_path: Path):
    start = int(test_log["ts"].min())
    rows = _all_rows(bundle)
    before = rows[rows["ts"] < start]
    # Seen sets: exactly the items each user was shown before the period (a plain loop over the log).
    for user in test_log["user_id"].astype(str).unique()[:40]:
        want = {bundle.item_row[i] for i in before.loc[before["user_id"].astype(str) == user, "item_id"].astype(str)}
        got = set(view.channels.seen_rows(bundle.user_row[user]).tolist())
        assert got == want
    # The future-row test: flip every outcome of the period; the as-of view must not change at all.
    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    path = copy / "features" / "interactions.parquet"
    log = pd.read_parquet(path)
    period = (log["ts"] >= start).to_numpy()
    signals = [s for s in ("click", "long_view", "like", "follow", "comment", "forward", "hate") if s in log]
    for s in signals:
        log.loc[period, s] = 1 - log.loc[period, s]
    log.to_parquet(path)
    flipped, _ = as_of(dataclasses.replace(bundle, path=copy), period_view(bundle, test_log)[0], start)
    np.testing.assert_array_equal(flipped.item_vectors, view.item_vectors)
    for name in ("trending", "fresh"):
        np.testing.assert_array_equal(getattr(flipped.channels, name), getattr(view.channels, name))
    assert (flipped.channels.covisit != view.channels.covisit).nnz == 0
    assert (flipped.channels.seen != view.channels.seen).nnz == 0
    # ... while what the shipped bundle holds, built from every row, does change with those outcomes.
    built = [build_channel_tables(pd.read_parquet(p), pd.read_parquet(copy / "features" / "items.parquet"),
                                  np.zeros(0, str), "long_view", 10, 50, 1.0, int(rows["ts"].max()) + 1).trending
             for p in (bundle.path / "features" / "interactions.parquet", path)]
    assert not np.array_equal(*built)
    # The user vector's MF part comes from the refitted factors, the rest from the graph as shipped.
    lo, hi = view.mf_dims
    user = test_log["user_id"].astype(str).iloc[0]
    row, hist = Recommender(view, ServeSettings()).user_lookup(view, user)
    shipped_vec = Recommender(bundle, ServeSettings())._user_vector(bundle, row, hist)
    as_of_vec = Recommender(view, ServeSettings())._user_vector(view, row, hist)
    np.testing.assert_allclose(np.delete(as_of_vec, np.s_[lo:hi], axis=1), np.delete(shipped_vec, np.s_[lo:hi], axis=1))
    assert not np.allclose(as_of_vec[:, lo:hi], shipped_vec[:, lo:hi])
    assert np.allclose(as_of_vec[:, lo:hi], flipped.user_tower.factors[view.user_cols["user_id_idx"][row]])


def test_every_arm_serves_through_the_request_path_and_is_scored_like_a_plain_loop(view: Bundle, test_log: pd.DataFrame):
    settings = ServeSettings(ServingConfig(candidates=60, evaluation_gains=["long_view", "click"]))
    arms = channel_arms(view, settings)
    assert SERVED in arms and {"ann", "mf", "covisit", "trending"} <= set(arms)
    assert all(sum(q.values()) == 60 for q in arms.values())
    out = feed_scores(view, settings, test_log, k=K, max_users=USERS)[0]
    assert out["users"] == USERS and set(out["arms"]) == set(arms)
    for name, m in out["arms"].items():
        for g in ("long_view", "click"):
            assert 0.0 <= m[f"ndcg@{K}_{g}"] <= 1.0 and 0.0 <= m[f"recall@{K}_{g}"] <= 1.0
        if name not in (SERVED, "ann"):  # a channel alone: its own items, the ANN's fill, exposure candidates
            assert set(m["channel_share"]) <= {f"channel:{name}", "channel:ann", "channel:exposure"}
    # The trending arm by hand: the same recommend call, NDCG against the user's whole period.
    rec = Recommender(view, ServeSettings(ServingConfig(candidates=60, evaluation_gains=["long_view", "click"],
                                                        channel_quotas={"trending": 60}), settings.policy))
    log = test_log.sort_values("ts", kind="stable")
    known = log[log["item_id"].astype(str).isin(set(view.item_row))]
    hits = known.groupby(known["user_id"].astype(str), sort=False)[["long_view", "click"]].max().max(axis=1)
    users = [u for u in dict.fromkeys(known["user_id"].astype(str)) if hits[u] > 0][:USERS]
    scores = []
    for user in users:
        mine = known[known["user_id"].astype(str) == user]
        best = mine.groupby(mine["item_id"].astype(str))["long_view"].max()
        if best.max() <= 0:
            continue
        first = mine.iloc[0]
        ctx = {n: str(first[n]) for _, n in view.request_cat if n != "user_id" and n in log}
        page = rec.recommend(user, K, context=ctx).items
        gains = np.array([[float(best.get(i.item_id, 0.0) > 0) for i in page]])
        scores.append(ndcg(gains, (best.to_numpy()[None] > 0).astype(float), K)[0])
    assert out["arms"]["trending"][f"ndcg@{K}_long_view"] == pytest.approx(float(np.mean(scores)), abs=1e-5)
    v = out["served_vs_best_single"]
    assert v["channel"] in set(arms) - {SERVED}
    assert v["ci95"][0] <= v["difference"] <= v["ci95"][1]
    best = out["arms"][v["channel"]][f"ndcg@{K}_long_view"]
    assert v["difference"] == pytest.approx(out["arms"][SERVED][f"ndcg@{K}_long_view"] - best, abs=1e-4)


def test_arms_sharing_retrieval_serve_what_each_would_serve_alone(view: Bundle, test_log: pd.DataFrame):
    """Arms with equal serving settings share the user's retrieval and every arm the ranker's scores; each
    arm's pages must still be what its own Recommender serves, user after user, in a plain loop."""
    base = ServeSettings(ServingConfig(candidates=60, evaluation_gains=["long_view", "click"]))
    arms = {"w0": with_retrieval_weight(base, 0.0), "w8": with_retrieval_weight(base, 8.0),
            "covisit_w8": with_retrieval_weight(
                ServeSettings(dataclasses.replace(base.serving, channel_quotas={"covisit": 60}), base.policy), 8.0)}
    out, per_user = page_scores(view, arms, test_log, K, max_users=USERS)
    log = test_log.sort_values("ts", kind="stable")
    known = log[log["item_id"].astype(str).isin(set(view.item_row)) & log["user_id"].astype(str).isin(set(view.user_row))]
    hits = known.groupby(known["user_id"].astype(str), sort=False)[["long_view", "click"]].max().max(axis=1)
    users = [u for u in dict.fromkeys(known["user_id"].astype(str)) if hits[u] > 0][:USERS]
    assert out["users"] == len(users)
    pages, creators = {}, {}
    for name, settings in arms.items():
        rec = Recommender(view, settings)
        want = []
        for user in users:
            mine = known[known["user_id"].astype(str) == user]
            best = mine.groupby(mine["item_id"].astype(str))["long_view"].max()
            first = mine.iloc[0]
            ctx = {n: str(first[n]) for _, n in view.request_cat if n != "user_id" and n in log}
            page = rec.recommend(user, K, context=ctx).items
            pages.setdefault(name, []).append([i.item_id for i in page])
            creators.setdefault(name, []).extend(i.creator_id for i in page)
            gains = np.array([[float(best.get(i.item_id, 0.0) > 0) for i in page]])
            want.append(ndcg(gains, (best.to_numpy()[None] > 0).astype(float), K)[0] if best.max() > 0 else np.nan)
        np.testing.assert_allclose(per_user[name], np.array(want), atol=1e-6)
        # Creator exposure over the catalogue (creators never served count as 0 slots).
        slots = pd.Series(creators[name]).value_counts().reindex(view.creator_ids, fill_value=0).to_numpy()
        assert out["arms"][name]["creator_gini_catalogue"] == pytest.approx(gini(slots), abs=1e-4)
    assert pages["w0"] != pages["w8"]  # the weight changes pages: the arms are not one arm three times


def test_channels_cli_writes_json_plot_and_an_mlflow_run(synthetic_bundle: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    # Explicit, and restored after: MLflow's set_tracking_uri also sets the variable for child processes.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    # A choice recorded by choose-channels on validation, where trending led the single channels (though it
    # was not served): the test compares the served page with it as well as with the test's own best.
    bundle = tmp_path / "bundle"
    shutil.copytree(synthetic_bundle, bundle)
    metric = "ndcg@20_long_view"
    arms = {"served": 0.05, "ann": 0.04, "covisit": 0.03, "trending": 0.06, "mf": None, "ann400+covisit100": 0.07}
    record = {"metric": metric, "arms": {a: {"quotas": {}, metric: v} for a, v in arms.items()}}
    amend_channel_quotas(bundle, load_bundle(synthetic_bundle).channel_quotas, "test",
                         lambda m: m.setdefault("retrieval", {}).setdefault("channels", {}).update(page_choice=record))
    r = subprocess.run([sys.executable, "-m", "evaluation", "channels", "--bundle", str(bundle),
                        "--out", "out/channels.json", "--k", "10", "--max-users", "15", "--no-progress",
                        "--mix", "half:ann=250,covisit=250"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "channels.json").read_text())
    assert result["users"] == 15 and result["data"]["period"] == "test"
    assert result["arms"]["half"]["quotas"] == {"ann": 250, "covisit": 250}
    assert result["data"]["as_of"]["rows_before"] > 0 and "mf" in result["data"]["as_of"]
    assert (tmp_path / "out" / "channels.png").stat().st_size > 1000
    assert "minus the best single channel" in r.stdout
    picked = result["served_vs_validation_single"]
    assert picked["channel"] == "trending" and picked["valid"] == 0.06  # a mix's lead is no single channel's
    assert picked["difference"] == pytest.approx(result["arms"]["served"]["ndcg@10_long_view"]
                                                 - result["arms"]["trending"]["ndcg@10_long_view"], abs=1e-9)
    assert "the single channel that led validation (trending" in r.stdout
    import mlflow

    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["feedstack"], filter_string="tags.kind = 'channel-eval'")
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.served.ndcg_at_10_long_view"] == pytest.approx(
        result["arms"]["served"]["ndcg@10_long_view"])


@pytest.mark.parametrize("mix", ["half", "half:ann=x", "half:ann"])
def test_channels_cli_names_a_malformed_mix(mix: str, tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "evaluation", "channels", "--bundle", str(tmp_path / "none"),
                        "--mix", mix, "--out", "c.json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "NAME:CHANNEL=N" in r.stderr
    assert not (tmp_path / "c.json").exists()


def test_offline_evaluation_runs_without_torch(synthetic_bundle: Path):
    """DESIGN.md: the offline evaluation sits on top of both layers and needs no torch; rebuilding retrieval as
    of a period start reads training code, but only its torch-free modules."""
    code = ("import sys; from evaluation import channels, policy; from evaluation.as_of import as_of; "
            "from serving.bundle import load_bundle; from serving.offline_cases import period_log, period_view; "
            f"b = load_bundle({str(synthetic_bundle)!r}); log = period_log(b, 'test'); "
            "v, note = as_of(b, period_view(b, log)[0], int(log['ts'].min())); assert 'mf' in note; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')); "
            "print(bad); sys.exit(1 if bad else 0)")
    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)})
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]


@pytest.mark.parametrize("period", ["valid", "test"])
def test_the_period_view_gives_the_ranker_the_inputs_it_was_trained_on(bundle: Bundle, period: str):
    """Every per-user, per-item, per-pair and per-context aggregate the ranker reads (user and item rates,
    fan relations, user x creator and item / creator x context behaviour) is, in the period view, what the
    training rows of that period carried: as of the period's start. The shipped tables count the period's
    own outcomes (for the validation period the test period's too): served from them, the ranker found the
    user's period positives through the user x creator counts, and the offline page measured that."""
    from serving.offline_cases import rows_after

    log = period_log(bundle, period)
    view, _ = period_view(bundle, log, rows_after(bundle, log))
    rec = Recommender(view, ServeSettings())
    sources = view.ranking.num.sources
    cols = [s.rsplit(":", 1)[1] for s in sources]
    assert any(s.startswith("user_creator:") for s in sources) and any(s.startswith("users:") for s in sources)
    creator_pos = [j for j, s in enumerate(sources) if s.startswith("items:creator_")]
    assert creator_pos
    ctx_names = [n for _, n in view.request_cat if n != "user_id" and n in log]
    sample = log.sample(min(len(log), 300), random_state=0)
    shipped_differs = 0
    for _, r in sample.iterrows():
        user, item = str(r["user_id"]), str(r["item_id"])
        row = view.user_row.get(user, -1)
        if row < 0 or item not in view.item_row:
            continue
        ctx = {n: str(r[n]) for n in ctx_names}
        rows = np.array([view.item_row[item]])
        _, num = rec.ranker_inputs(view, user, row, rows, ctx)
        want = r[cols].to_numpy(np.float32)
        np.testing.assert_allclose(num[0], want, rtol=1e-5, atol=1e-6, equal_nan=True,
                                   err_msg=f"user {user}, item {item}: {sources}")
        _, shipped = Recommender(bundle, ServeSettings()).ranker_inputs(bundle, user, row, rows, ctx)
        shipped_differs += not np.allclose(shipped[0], want, rtol=1e-5, atol=1e-6, equal_nan=True)
        # The creator's aggregates are the creator's, also on its items nobody was shown since the start.
        siblings = np.flatnonzero(view.item_creator == view.item_creator[rows[0]])
        _, other = rec.ranker_inputs(view, user, row, siblings[siblings != rows[0]][:3], ctx)
        np.testing.assert_allclose(other[:, creator_pos], np.broadcast_to(want[creator_pos], (len(other), len(creator_pos))),
                                   rtol=1e-5, atol=1e-6, equal_nan=True)
    assert shipped_differs > 0  # the snapshot does differ: the check above is not comparing equal tables
    # The history too: each user's first row from the start on, also for a user with no row in the period
    # but rows after it (here: one user's period rows left out), whose shipped history knows those later rows.
    later = rows_after(bundle, log)
    if len(later):
        gone = str(later["user_id"].value_counts().index[0])
        without, _ = period_view(bundle, log[log["user_id"].astype(str) != gone], later)
        mine = later[later["user_id"].astype(str) == gone].sort_values("ts", kind="stable")
        row = bundle.user_row[gone]
        np.testing.assert_array_equal(without.history[row], np.asarray(mine["history"].iloc[0], np.int64))
        assert not np.array_equal(bundle.history[row], without.history[row])
    for _, r in log.drop_duplicates("user_id").head(100).iterrows():
        np.testing.assert_array_equal(view.history[view.user_row[str(r["user_id"])]], np.asarray(r["history"], np.int64))
    # The policy's high-quality creator flags follow the same as-of creator aggregates, by the build's rule
    # (which, applied to the shipped aggregates, gives the shipped flags).
    from serving.offline_cases import _high_quality

    items = [s.split(":", 1)[1] for s in sources if s.startswith("items:")]
    np.testing.assert_array_equal(_high_quality(bundle, bundle.item_num, items), bundle.high_quality)
    np.testing.assert_array_equal(view.high_quality, _high_quality(bundle, view.item_num, items))
