"""Serving fixtures: the bundle to serve is the real one trained on the synthetic world (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def serving_bundle(synthetic_bundle: Path) -> Path:
    return Path(synthetic_bundle)
