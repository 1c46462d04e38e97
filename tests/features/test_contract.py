"""The typed bundle contract (features/contract.py) on the JSON files of a real bundle trained by the test
fixtures: round trips, refusals that name the key, and the bundles from before (same keys) still read."""

import json
from pathlib import Path

import pytest

from features.bundle import COMPONENTS, BundleError, verify_bundle
from features.contract import (MANIFEST, RANKING, RANKING_JSON, RETRIEVAL, RETRIEVAL_JSON, Manifest, RankingSpec,
                               RetrievalSpec)

SPECS = [(RankingSpec, Path(RANKING) / RANKING_JSON), (RetrievalSpec, Path(RETRIEVAL) / RETRIEVAL_JSON),
         (Manifest, Path(MANIFEST))]


def _raw(bundle: Path, rel: Path) -> dict:
    return json.loads((bundle / rel).read_text())


@pytest.mark.parametrize("cls, rel", SPECS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_bundle_json_round_trips_and_keeps_every_key(synthetic_bundle: Path, cls, rel):
    raw = _raw(synthetic_bundle, rel)
    spec = cls.from_json(raw)
    assert cls.from_json(spec.to_json()) == spec
    assert spec.to_json() == raw  # nothing written is lost, renamed or added


def test_typed_fields_are_what_serving_reads(synthetic_bundle: Path):
    ranking = RankingSpec.from_json(_raw(synthetic_bundle, SPECS[0][1]))
    assert [ranking.cat.name, ranking.hist.name, ranking.num.name] == ["cat", "hist", "num"]
    assert len(ranking.cat.columns) == len(ranking.cat.sources) and len(ranking.num.columns) == len(ranking.num.sources)
    assert ranking.scores.columns == ranking.head_names and ranking.request_onnx == "ranker_request.onnx"
    assert {h.kind for h in ranking.heads} == {"binary", "watch_time"} and ranking.watch_time is not None
    assert "calibration" in ranking.other and "gbdt_weight" in ranking.other["calibration"]
    retrieval = RetrievalSpec.from_json(_raw(synthetic_bundle, SPECS[1][1]))
    assert retrieval.item_vectors.shape == [len(retrieval.item_vectors.item_ids), retrieval.embedding_dim]
    assert retrieval.channels is not None and retrieval.mf is not None
    manifest = Manifest.from_json(verify_bundle(synthetic_bundle))
    assert manifest.index_factory == retrieval.index.factory  # the manifest names its FAISS factory
    assert manifest.heads == ranking.heads
    assert set(COMPONENTS) == set(manifest.components)


@pytest.mark.parametrize(
    "cls, rel, edit, message",
    [
        (RankingSpec, SPECS[0][1], lambda m: m["inputs"][2].pop("sources"),
         r"^ranking/ranking\.json: missing bundle key 'inputs\[2\]\.sources'$"),
        (RankingSpec, SPECS[0][1], lambda m: m.pop("scenarios"), r"^ranking/ranking\.json: missing bundle key 'scenarios'$"),
        (RetrievalSpec, SPECS[1][1], lambda m: m["index"].pop("search_params"),
         r"^retrieval/retrieval\.json: missing bundle key 'index\.search_params'$"),
        (Manifest, SPECS[2][1], lambda m: m.pop("feature_spec"), r"^manifest\.json: missing bundle key 'feature_spec'$"),
    ],
)
def test_a_missing_key_is_refused_naming_it(synthetic_bundle: Path, cls, rel, edit, message):
    raw = _raw(synthetic_bundle, rel)
    edit(raw)
    with pytest.raises(BundleError, match=message):
        cls.from_json(raw)


@pytest.mark.parametrize(
    "cls, rel, edit, key",
    [
        # the keys the old reader guessed at, which training never writes
        (RankingSpec, SPECS[0][1], lambda m: m.update(head_kinds=["binary"]), "head_kinds"),
        (RankingSpec, SPECS[0][1], lambda m: m.update(features={}), "features"),
        (RetrievalSpec, SPECS[1][1], lambda m: m.update(search_params={"efSearch": 64}), "search_params"),
        (RankingSpec, SPECS[0][1], lambda m: m["inputs"][0].update(categorical=True), r"inputs\[0\]\.categorical"),
        (RankingSpec, SPECS[0][1], lambda m: m["heads"][0].update(kinds="binary"), r"heads\[0\]\.kinds"),
        (RetrievalSpec, SPECS[1][1], lambda m: m["user_tower"]["output"].update(norm="l2"), r"user_tower\.output\.norm"),
        (Manifest, SPECS[2][1], lambda m: m.update(synthetic_catalogue={}), "synthetic_catalogue"),
    ],
)
def test_an_unknown_key_is_refused_naming_it(synthetic_bundle: Path, cls, rel, edit, key):
    raw = _raw(synthetic_bundle, rel)
    edit(raw)
    with pytest.raises(BundleError, match=rf"^{cls.FILE.replace('.', '[.]')}: unknown bundle key '{key}'; known keys here: \[[^\n]*\]$"):
        cls.from_json(raw)


def test_wrong_types_shapes_and_versions_are_refused(synthetic_bundle: Path):
    raw = _raw(synthetic_bundle, SPECS[0][1])
    with pytest.raises(BundleError, match=r"heads\[0\]\.kind: 'ctr' is not one of \['binary', 'watch_time'\]"):
        RankingSpec.from_json({**raw, "heads": [{**raw["heads"][0], "kind": "ctr"}]})
    with pytest.raises(BundleError, match=r"ranking/ranking\.json: inputs: expected a list of 3 to 3 entries, got 2"):
        RankingSpec.from_json({**raw, "inputs": raw["inputs"][:2]})
    with pytest.raises(BundleError, match=r"ranking/ranking\.json: format_version 2, this code reads 1"):
        RankingSpec.from_json({**raw, "format_version": 2})


def test_bundles_from_before_the_optional_sections_still_read(synthetic_bundle: Path):
    """A ranker without a watch-time head or a request graph, retrieval without channels or MF dimensions."""
    raw = _raw(synthetic_bundle, SPECS[0][1])
    del raw["request_onnx"]
    raw["outputs"] = raw["outputs"][:1]
    ranking = RankingSpec.from_json(raw)
    assert ranking.request_onnx is None and ranking.watch_time is None
    assert len(ranking.to_json()["outputs"]) == 1
    raw = _raw(synthetic_bundle, SPECS[1][1])
    for key in ("channels", "mf"):
        del raw[key]
    del raw["files"]["channels"]
    retrieval = RetrievalSpec.from_json(raw)
    assert retrieval.channels is None and retrieval.mf is None and retrieval.files.channels is None
