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


@pytest.fixture(scope="session")
def source_ckpt(tmp_path_factory):
    """A frozen source checkpoint in the project's format: a seeded random ResNet20, 5 classes."""
    import torch

    from l2t_dist.models import build_model
    from l2t_dist.sources.zoo import save_model_checkpoint

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("src") / "src.pt"
    save_model_checkpoint(str(path), build_model("resnet20", 5), "resnet20", meta={"note": "random"})
    return str(path)
