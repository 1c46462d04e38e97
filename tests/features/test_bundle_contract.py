import json
import shutil

import pytest

from features.bundle import BUNDLE_FORMAT_VERSION, BundleError, verify_bundle, write_manifest


@pytest.fixture()
def bundle(synthetic_tables, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(synthetic_tables.dir, b / "features")
    write_manifest(b, {"dataset": "synthetic"})
    return b


def test_sound_bundle_verifies_and_lists_every_file(bundle):
    m = verify_bundle(bundle, require=("features",))
    assert m["format_version"] == BUNDLE_FORMAT_VERSION and m["components"] == ["features"]
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    on_disk.remove("manifest.json")
    assert sorted(m["files"]) == on_disk


def test_tampered_file_is_refused(bundle):
    with open(bundle / "features" / "items.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match="checksum mismatch for features/items.parquet"):
        verify_bundle(bundle, require=("features",))


def test_missing_component_file_and_version_are_refused(bundle):
    with pytest.raises(BundleError, match="lacks the retrieval component"):
        verify_bundle(bundle)
    (bundle / "features" / "fans.parquet").unlink()
    with pytest.raises(BundleError, match="bundle file missing: features/fans.parquet"):
        verify_bundle(bundle, require=("features",))
    m = json.loads((bundle / "manifest.json").read_text())
    m["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version 99"):
        verify_bundle(bundle, require=("features",))
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        verify_bundle(bundle, require=("features",))
