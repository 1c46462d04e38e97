"""The request path in process (no HTTP): loading, retrieval + ranking + policy, cold start, governance,
reload of a corrupt bundle, and the import boundary (serving needs neither torch nor training)."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.bundle import BundleError
from serving.bundle import load_bundle
from serving.candidates import CHANNEL_REASONS
from serving.config import ServeSettings, settings_from_raw
from serving.recommender import Recommender
from serving.results import RequestError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rec(serving_bundle: Path) -> Recommender:
    return Recommender(load_bundle(serving_bundle), ServeSettings())


def test_recommend_returns_a_governed_page(rec: Recommender):
    b = rec.bundle
    user = next(iter(b.user_row))
    r = rec.recommend(user, 10)
    assert len(r.items) == 10 and not r.cold_start
    assert r.bundle_version == b.version and r.candidates > 10
    ids = [i.item_id for i in r.items]
    assert len(set(ids)) == 10
    rows = [b.item_row[i] for i in ids]
    assert b.visible[rows].all()
    for it in r.items:
        assert set(it.predictions) == set(b.heads)
        assert it.reasons and it.creator_id == b.creator_ids[b.item_creator[b.item_row[it.item_id]]]
    scores = [i.score for i in r.items]
    assert all(np.isfinite(scores))


def test_unknown_user_gets_a_cold_start_feed(rec: Recommender):
    r = rec.recommend("no-such-user", 5)
    assert r.cold_start and len(r.items) == 5
    pop = Recommender(rec.bundle, settings_from_raw({"serving": {"cold_start": "popular"}}))
    r2 = pop.recommend("no-such-user", 5)
    assert r2.cold_start and len(r2.items) == 5


def test_unknown_scenario_names_the_field(rec: Recommender):
    with pytest.raises(RequestError, match="unknown scenario 'nope'") as e:
        rec.recommend(next(iter(rec.bundle.user_row)), 5, scenario="nope")
    assert e.value.field == "scenario"


def test_exclude_and_block_take_effect(rec: Recommender):
    user = next(iter(rec.bundle.user_row))
    first = rec.recommend(user, 10)
    top = first.items[0]
    r = rec.recommend(user, 10, exclude_item_ids=[top.item_id])
    assert top.item_id not in {i.item_id for i in r.items}
    rec.block(item_ids=[first.items[1].item_id], creator_ids=[first.items[2].creator_id])
    try:
        for _ in range(3):
            r = rec.recommend(user, 10)
            assert first.items[1].item_id not in {i.item_id for i in r.items}
            assert first.items[2].creator_id not in {i.creator_id for i in r.items}
        ranked = rec.rank(user, [first.items[1].item_id, first.items[3].item_id, "no-such-item"])
        assert ranked.unknown_item_ids == ["no-such-item"]
        assert ranked.filtered_item_ids == [first.items[1].item_id]
    finally:
        rec.block(item_ids=[first.items[1].item_id], creator_ids=[first.items[2].creator_id], unblock=True)


def test_rank_orders_given_items_by_fused_score(rec: Recommender):
    b = rec.bundle
    user = next(iter(b.user_row))
    ids = [str(i) for i in b.item_ids[b.visible][:30]]
    r = rec.rank(user, ids + ids[:3], scenario="commerce")
    assert len(r.items) == 30 and r.scenario == "commerce"
    scores = [i.score for i in r.items]
    assert scores == sorted(scores, reverse=True)


def test_corrupt_bundle_is_refused_and_the_old_one_keeps_serving(serving_bundle: Path, tmp_path: Path):
    rec = Recommender(load_bundle(serving_bundle), ServeSettings())
    bad = tmp_path / "bad"
    shutil.copytree(serving_bundle, bad)
    with open(bad / "ranking" / "ranker.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00corrupt\x00")
    version = rec.bundle.version
    with pytest.raises(BundleError, match="checksum mismatch for ranking/ranker.onnx"):
        rec.reload(str(bad))
    assert rec.bundle.version == version
    assert len(rec.recommend(next(iter(rec.bundle.user_row)), 5).items) == 5
    wrong = tmp_path / "wrong_format"
    shutil.copytree(serving_bundle, wrong)
    m = json.loads((wrong / "manifest.json").read_text())
    m["format_version"] = 99
    (wrong / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version 99"):
        rec.reload(str(wrong))
    info = rec.reload(str(serving_bundle))
    assert info["version"] == version


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_serving_imports_neither_training_nor_torch():
    for path in sorted((REPO / "serving").rglob("*.py")):
        bad = _imports(path) & {"training", "torch", "lightning", "pytorch_lightning"}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
    code = ("import sys, serving.service, serving.recommender, serving.policy, serving.__main__; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'training')); "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"BENTOML_DO_NOT_TRACK": "true", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stdout + res.stderr


def test_loads_models_uri_from_the_mlflow_registry(serving_bundle: Path, tmp_path: Path):
    """models:/feedstack@production resolves through the registry, downloads, verifies and serves."""
    import mlflow

    from serving.bundle import resolve_bundle

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.create_experiment("serving-test", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifacts(str(serving_bundle), "bundle")
            source = mlflow.get_artifact_uri("bundle")
        client = mlflow.MlflowClient()
        client.create_registered_model("feedstack")
        mv = client.create_model_version("feedstack", source=source, run_id=run.info.run_id)
        client.set_registered_model_alias("feedstack", "production", mv.version)
        path, version = resolve_bundle("models:/feedstack@production", str(tmp_path / "dl"), uri)
        assert version == str(mv.version)
        bundle = load_bundle(path, registry_version=version)
        assert bundle.version.startswith(f"{mv.version}-")
        assert len(Recommender(bundle, ServeSettings()).recommend("u", 3).items) == 3
        with pytest.raises(BundleError, match="cannot resolve models:/feedstack@staging"):
            resolve_bundle("models:/feedstack@staging", str(tmp_path / "dl2"), uri)
    finally:
        mlflow.set_tracking_uri(None)


def _exposure_rec(serving_bundle: Path, slots: int, **policy) -> Recommender:
    raw = {"serving": {"candidates": 20},
           "policy": {"exposure": {"candidate_slots": slots}, "exposure_control": {"update_every": 5}, **policy}}
    return Recommender(load_bundle(serving_bundle), settings_from_raw(raw))


def test_exposure_candidates_widen_creator_reach_and_respect_governance(serving_bundle: Path):
    users = sorted(load_bundle(serving_bundle).user_row)[:60]
    creators: dict[int, set[str]] = {}
    for slots in (0, 6):
        rec = _exposure_rec(serving_bundle, slots)
        seen: set[str] = set()
        for u in users:
            r = rec.recommend(u, 10)
            seen |= {i.creator_id for i in r.items}
            assert slots or r.candidates == 20  # 0 disables the step
            if slots:
                assert r.candidates <= 20 + slots
        creators[slots] = seen
    assert len(creators[6]) > len(creators[0])

    # Governance: blocked items / creators and non-visible items never enter through the exposure pool.
    rec = _exposure_rec(serving_bundle, 6)
    b = rec.bundle
    for u in users[:20]:
        rec.recommend(u, 10)
    pool_rows, _ = rec._exposure_pool(rec.state)
    blocked_creators = sorted({str(c) for c in b.creator_ids[b.item_creator[pool_rows[:40]]]})[:3]
    blocked_items = [str(b.item_ids[r]) for r in pool_rows[40:60]]
    rec.block(item_ids=blocked_items, creator_ids=blocked_creators)
    bad = ~rec.state.servable
    assert bad.any() and (~b.visible).any()
    n_added = 0
    for u in users:
        row, hist = rec.user_lookup(b, u)
        rows, _, vec = rec.search(rec.state, row, hist, 20)
        extra = rec.exposure_candidates(rec.state, vec, rows, "default" if "default" in rec.scenarios else rec.scenarios[0])
        assert not bad[extra].any()
        n_added += len(extra)
        r = rec.recommend(u, 10)
        served = np.array([b.item_row[i.item_id] for i in r.items])
        assert not bad[served].any()
        assert not {i.creator_id for i in r.items} & set(blocked_creators)
    assert n_added > 0


def test_exposure_pool_size_and_per_creator_limit(serving_bundle: Path):
    users = sorted(load_bundle(serving_bundle).user_row)[:30]
    for size, per_creator in ((15, 1), (40, 2)):
        rec = _exposure_rec(serving_bundle, 4, exposure_control={"update_every": 5, "pool_size": size,
                                                                 "pool_per_creator": per_creator})
        for u in users:
            rec.recommend(u, 10)
        rows, vecs = rec._exposure_pool(rec.state)
        b = rec.bundle
        assert 0 < len(rows) <= size and len(vecs) == len(rows)
        assert np.bincount(b.item_creator[rows]).max() <= per_creator
        # Only creators below the mean exposure, least exposed first.
        e = rec.exposure.exposure()[b.item_creator[rows]]
        assert np.all(e < rec.exposure.mean_exposure()) and np.all(np.diff(e) >= 0)


def _ranker_feeds(rec: Recommender, user: str, rows: np.ndarray, context: dict) -> dict[str, np.ndarray]:
    """The inputs the request path hands the ONNX ranker for ``user``'s candidates ``rows``."""
    b = rec.bundle
    row, hist = rec.user_lookup(b, user)
    feeds: dict[str, np.ndarray] = {}
    ranker = b.ranker

    class Spy:
        def run(self, outs, f):
            feeds.update(f)
            return ranker.run(outs, f)

    b.ranker = Spy()
    try:
        rec._rank(b, user, row, hist, rows, context)
    finally:
        b.ranker = ranker
    return feeds


def test_requests_are_scored_with_the_request_graph_and_match_the_full_ranker(serving_bundle: Path):
    import onnxruntime as ort

    b = load_bundle(serving_bundle)
    assert b.ranker_file == "ranker_request.onnx"
    full = ort.InferenceSession(str(serving_bundle / "ranking" / "ranker.onnx"), providers=["CPUExecutionProvider"])
    rec = Recommender(b, ServeSettings())
    users = sorted(b.user_row)[:5] + ["someone-new"]  # a cold-start user too
    rows = np.arange(min(b.n_items, 300))
    for u in users:
        row, hist = rec.user_lookup(b, u)
        fast, watch = rec._rank(b, u, row, hist, rows, {"hour": 9})
        feeds = _ranker_feeds(rec, u, rows, {"hour": 9})
        ref = full.run(None, feeds)
        np.testing.assert_allclose(fast, ref[0], rtol=1e-5, atol=1e-6)
        if watch is not None:
            np.testing.assert_allclose(watch / 1000.0, ref[1], rtol=1e-5, atol=1e-4)


def test_a_bundle_naming_a_missing_request_graph_is_refused(serving_bundle: Path, tmp_path: Path):
    copy = tmp_path / "bundle"
    shutil.copytree(serving_bundle, copy)
    (copy / "ranking" / "ranker_request.onnx").unlink()
    with pytest.raises(BundleError, match="ranker_request.onnx"):
        load_bundle(copy)


def _rewritten(bundle: Path, dst: Path, rel: str, edit) -> Path:
    """A copy of ``bundle`` with the JSON file ``rel`` edited and the manifest re-checksummed (so only the
    typed reader can refuse it)."""
    from features.bundle import write_manifest

    shutil.copytree(bundle, dst)
    meta = json.loads((dst / rel).read_text())
    edit(meta)
    (dst / rel).write_text(json.dumps(meta))
    manifest = json.loads((dst / "manifest.json").read_text())
    write_manifest(dst, {k: v for k, v in manifest.items() if k not in ("format_version", "components", "files")})
    return dst


def test_the_bundle_loads_through_the_typed_contract(serving_bundle: Path):
    from features.contract import Manifest, RankingSpec, RetrievalSpec

    b = load_bundle(serving_bundle)
    assert isinstance(b.manifest, Manifest) and isinstance(b.ranking, RankingSpec)
    assert isinstance(b.retrieval, RetrievalSpec)
    assert b.manifest.index_factory == b.retrieval.index.factory and b.heads == b.ranking.head_names


@pytest.mark.parametrize("rel, edit, message", [
    ("ranking/ranking.json", lambda m: m.update(head_kinds=["binary"]), "unknown bundle key 'head_kinds'"),
    ("ranking/ranking.json", lambda m: m["inputs"][0].pop("sources"), r"missing bundle key 'inputs\[0\]\.sources'"),
    ("retrieval/retrieval.json", lambda m: m.update(search_params={}), "unknown bundle key 'search_params'"),
    ("ranking/ranking.json", lambda m: m["inputs"][0].update(name="categorical"),
     r"ranker_request\.onnx takes inputs \['cat', 'hist', 'num'\]; ranking/ranking\.json names \['categorical'"),
    ("retrieval/retrieval.json", lambda m: m["mf"].update(dimensions=[m["mf"]["dimensions"][0], 999]),
     r"the MF dimensions \[\d+, 999\) of \d+ items do not fit"),
])
def test_a_bundle_off_the_contract_is_refused(serving_bundle: Path, tmp_path: Path, rel, edit, message):
    bad = _rewritten(serving_bundle, tmp_path / "bad", rel, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bad)


def test_behaviour_inputs_at_serving_equal_the_offline_snapshot(serving_bundle: Path):
    """What /recommend and /rank feed the ranker for the behaviour sources (per user, per user x creator,
    per item / creator x context) equals FeatureTables.attach_snapshot, the path of `evaluate --log`."""
    import pandas as pd

    from features.tables import FeatureTables

    b = load_bundle(serving_bundle)
    tables = FeatureTables.load(serving_bundle / "features")
    rec = Recommender(b, ServeSettings())
    k = b.ranking
    kinds = ("users", "user_creator", "item_ctx", "creator_ctx")
    pos = [i for i, s in enumerate(k.num.sources) if s.split(":")[0] in kinds]
    assert {k.num.sources[i].split(":")[0] for i in pos} == set(kinds)
    uc = tables.behaviour["user_creator"]
    tab = str(tables.behaviour["item_tab"]["tab"].iloc[0])
    hits = 0
    for u in list(uc["user_id"].astype(str).unique()[:4]) + ["someone-new"]:
        seen = set(uc.loc[uc["user_id"].astype(str) == u, "creator_id"].astype(str))
        rows = np.unique(np.r_[np.arange(min(b.n_items, 200)),
                               np.flatnonzero(np.isin(b.creator_ids[b.item_creator], list(seen)))])
        for context in ({"hour": 9, "tab": tab}, {"hour": 9}):
            feeds = _ranker_feeds(rec, u, rows, context)
            frame = pd.DataFrame({"user_id": u, "item_id": b.item_ids[rows],
                                  "creator_id": b.creator_ids[b.item_creator[rows]]})
            if "tab" in context:
                frame["tab"] = tab
            expect = tables.attach_snapshot(frame)[[k.num.columns[i] for i in pos]].to_numpy(np.float32)
            np.testing.assert_allclose(feeds[k.num.name][:, pos], expect, rtol=1e-6, equal_nan=True)
            hits += int((feeds[k.num.name][:, k.num.columns.index("uc_n")] > 0).sum())
    assert hits > 0  # some candidates were of creators the user had seen


def test_the_mf_channel_serves_unseen_items_ranked_by_the_mf_factors(serving_bundle: Path):
    b = load_bundle(serving_bundle)
    assert b.mf_dims is not None and b.mf_items is not None  # the fixture folds MF into the vectors
    rec = Recommender(b, settings_from_raw({"serving": {"candidates": 60, "channel_quotas": {"ann": 30, "mf": 30}}}))
    user = max(b.user_row, key=lambda u: len(b.channels.seen_rows(b.user_row[u])))  # the most seen
    row = b.user_row[user]
    r = rec.recommend(user, 60)
    got = [(b.item_row[i.item_id], i.reasons) for i in r.items]
    mf_rows = [x for x, reasons in got if "channel:mf" in reasons]
    assert mf_rows, "no MF candidate reached the page"
    seen = set(b.channels.seen_rows(row).tolist())
    assert not seen & {x for x, _ in got}
    # Each MF candidate is among the best MF scores once the seen items are set aside (ANN took at most 30).
    vec = rec.search(rec.state, row, b.history[row], 1)[2]
    score = b.mf_items @ vec[0, b.mf_dims[0]:b.mf_dims[1]]
    ranked = [x for x in np.argsort(-score, kind="stable") if x not in seen]
    assert set(mf_rows) <= set(ranked[:60])
    # Above serving.mf_channel_max_items the channel is off and its quota goes to the ANN.
    off = Recommender(b, settings_from_raw({"serving": {"candidates": 60, "mf_channel_max_items": b.n_items - 1,
                                                        "channel_quotas": {"ann": 30, "mf": 30}}}))
    r = off.recommend(user, 60)
    assert r.items and not any("channel:mf" in i.reasons for i in r.items)


def test_the_ann_fills_what_a_short_channel_leaves(serving_bundle: Path):
    b = load_bundle(serving_bundle)
    n = 300
    quotas = {"serving": {"candidates": n, "channel_quotas": {"covisit": n}}}
    on = Recommender(b, settings_from_raw(quotas))
    off = Recommender(b, settings_from_raw({"serving": {**quotas["serving"], "fill_from_ann": False}}))
    user = min(b.user_row, key=lambda u: len(b.channels.seen_rows(b.user_row[u])))  # the shortest history
    row = b.user_row[user]
    blocked, n_mine = on._blocked(on.state, user, row, (), ())
    short, _, _, _ = off._merged(off.state, row, b.history[row], blocked, n_mine)
    rows, tags, _, _ = on._merged(on.state, row, b.history[row], blocked, n_mine)
    assert len(short) < n, f"the fixture's co-visitation table should not fill {n} for this user"
    assert len(rows) == n and rows[:len(short)].tolist() == short.tolist() and not blocked[rows].any()
    assert {CHANNEL_REASONS[t] for t in tags[len(short):]} == {"channel:ann"}
    # A user the bundle never saw has no history for co-visitation: the ANN (cold-start vector) fills it all.
    assert on.recommend("no-such-user", 10).candidates >= n and off.recommend("no-such-user", 10).candidates < n


def test_a_retrieval_weight_orders_the_page_by_the_served_vectors(serving_bundle: Path, tmp_path: Path):
    """policy.fusion.retrieval_weight: with a weight that dwarfs the ranker, an engagement-only page is the
    candidates in order of user vector . item vector; with the default (the bundle's, 0 unless chosen) it is
    the ranker's order; a bundle amended with a chosen weight serves it."""
    from features.bundle import amend_channel_quotas

    off = {s: {"enabled": False} for s in ("fans_first", "quality", "exposure", "diversity", "exploration")}

    def rec_with(weight, bundle=serving_bundle) -> Recommender:
        policy = {**off, "fusion": {"retrieval_weight": weight}} if weight is not None else off
        return Recommender(load_bundle(bundle), settings_from_raw({"policy": policy}))

    heavy, plain = rec_with(1e6), rec_with(None)
    b = heavy.bundle
    vecs = heavy._item_vectors(b)
    moved = 0
    for u in sorted(b.user_row)[:15]:
        row, hist = heavy.user_lookup(b, u)
        u_vec = heavy._user_vector(b, row, hist)[0]
        aff = [float(vecs[b.item_row[i.item_id]] @ u_vec) for i in heavy.recommend(u, 10).items]
        assert aff == sorted(aff, reverse=True)
        ranked = [i.item_id for i in plain.recommend(u, 10).items]
        moved += ranked != [i.item_id for i in heavy.recommend(u, 10).items]
        # /rank applies the same fusion to the client's candidates
        given = [i.item_id for i in plain.recommend(u, 20).items]
        by_rank = [float(vecs[b.item_row[i.item_id]] @ u_vec) for i in heavy.rank(u, given).items]
        assert by_rank == sorted(by_rank, reverse=True)
    assert moved > 0
    amended = tmp_path / "bundle"
    shutil.copytree(serving_bundle, amended)
    amend_channel_quotas(amended, load_bundle(serving_bundle).channel_quotas, "a test", retrieval_weight=1e6)
    assert load_bundle(amended).page_retrieval_weight == 1e6
    u = sorted(b.user_row)[0]
    assert ([i.item_id for i in rec_with(None, amended).recommend(u, 10).items]
            == [i.item_id for i in heavy.recommend(u, 10).items])
    with pytest.raises(BundleError, match="retrieval weight"):
        amend_channel_quotas(amended, load_bundle(serving_bundle).channel_quotas, "x", retrieval_weight=-1.0)
