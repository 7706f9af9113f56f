"""Small synthetic data shared by the data_prep tests (64 px images keep them fast)."""

from pathlib import Path

import pytest

from data_prep.synth import generate


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory) -> Path:
    """30 synthetic scenes (24 train, 6 val); read-only for the tests."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, images=30, seed=3, image_size=64, val_fraction=0.2)
    return out
