"""Shared fixtures. Real data lives in ../shared (or $L2T_SHARED); tests that need it skip
only when it is absent. CI always has it."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_path() -> Path | None:
    env = os.environ.get("L2T_SHARED")
    path = Path(env) if env else REPO.parent / "shared"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = shared_path()
    if path is None:
        pytest.skip("real data folder not found: set L2T_SHARED to the shared/ folder")
    return path


@pytest.fixture
def single_thread():
    """Tiny tensors gain nothing from threads, and spinning threads slow down on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
