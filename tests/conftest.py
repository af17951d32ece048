"""Shared fixtures: the repository's paths, the shared data directory, tiny configs."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
VOCAB_PATH = SHARED_DATA / "t5" / "spiece.model"
T5X_TINY = SHARED_DATA / "t5" / "t5x_tiny_checkpoint" / "checkpoint_3"

# Tests run on one CPU device unless they ask for more (see test_partitioning).
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def shared_file(*parts: str) -> pathlib.Path:
    """A file under ../shared/data, or skip the test naming what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (see ../shared/data/SOURCES.md)")
    return path


@pytest.fixture
def vocab_path() -> pathlib.Path:
    return shared_file("t5", "spiece.model")


@pytest.fixture(autouse=True)
def _fresh_gin():
    """Tests that run a job in-process leave its gin bindings behind (e.g. the demo's
    `data_paths.data_dir`, which outranks the environment); no other test may see them."""
    yield
    import gin

    gin.clear_config()
