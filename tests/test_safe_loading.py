"""Reading a checkpoint never runs code unless the user opts in, for that file.

The hostile file is a real pickle whose unpickling calls os.system to create a marker file
(what ran during `l2t-dist sources inspect evil.pth --arch resnet20` before). Every way in
must refuse it without creating the marker and name the opt-in; with the opt-in, the marker
does appear (in a tmp dir): the opt-in really is "run this file".
"""

import os
import shlex

import numpy as np
import pytest
import torch

from l2t_dist.cli import main
from l2t_dist.config import parse_job
from l2t_dist.errors import CheckpointError
from l2t_dist.models import build_model
from l2t_dist.sources.colocated import load_sources
from l2t_dist.sources.zoo import load_source, read_checkpoint

REAL = ["l2tww_tinyimagenet200_resnet32_model_best.pth.tar", "akamaster_cifar10_resnet20-12fca82f.th",
        "akamaster_cifar10_resnet32-d509ac18.th"]


class Payload:
    """Unpickles by running a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def evil(tmp_path):
    """A valid resnet20 source checkpoint plus a payload that touches `marker` when unpickled."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = Payload(f"touch {shlex.quote(str(marker))}")
    torch.save({"state_dict": build_model("resnet20", 10).state_dict(), "note": payload}, path)
    assert not marker.exists()
    return path, marker


def test_zoo_refuses_and_names_the_opt_in(evil):
    path, marker = evil
    for read in (lambda: read_checkpoint(path), lambda: load_source(path, "resnet20")):
        with pytest.raises(CheckpointError) as err:
            read()
        msg = str(err.value)
        assert "posix.system" in msg or "os.system" in msg
        assert "allow_unsafe_pickle" in msg and "--allow-unsafe-pickle" in msg and str(path) in msg
        assert not marker.exists()
    model, meta = load_source(path, "resnet20", allow_unsafe_pickle=True)
    assert marker.exists() and meta["note"] == 0  # os.system's exit status: the command ran
    assert model.num_classes == 10


@pytest.mark.parametrize("command", ["inspect", "eval"])
def test_cli_refuses_without_the_flag(evil, capsys, command):
    path, marker = evil
    argv = ["sources", command, str(path), "--arch", "resnet20"]
    if command == "eval":
        argv += ["--data", "synthetic:task=a,classes=10,per_class=1,size=32,seed=0", "--split", "test"]
    assert main(argv) == 2
    assert "--allow-unsafe-pickle" in capsys.readouterr().err and not marker.exists()
    assert main(argv + ["--allow-unsafe-pickle", "--json"]) == 0
    assert marker.exists()


def test_job_source_refuses_without_the_field(evil):
    path, marker = evil
    source = {"name": "s", "arch": "resnet20", "checkpoint": str(path)}
    with pytest.raises(CheckpointError, match="allow_unsafe_pickle"):
        load_sources(parse_job({"sources": [source]}).sources, torch.device("cpu"))
    assert not marker.exists()
    [loaded] = load_sources(parse_job({"sources": [{**source, "allow_unsafe_pickle": True}]}).sources,
                            torch.device("cpu"))
    assert marker.exists() and loaded.model.num_classes == 10


def test_training_state_is_never_unpickled(evil):
    from l2t_dist.train.state import TrainingState

    path, marker = evil
    with pytest.raises(CheckpointError, match="refused"):
        TrainingState.load(path)
    assert not marker.exists()


def test_plain_data_loads_without_the_opt_in(tmp_path):
    """numpy scalars and argparse.Namespace (common in training scripts' checkpoints) rebuild data
    only: they load with weights_only=True."""
    import argparse

    sd = build_model("resnet20", 10).state_dict()
    torch.save({"state_dict": sd, "best_acc": np.float64(91.5), "epoch": np.int64(7),
                "args": argparse.Namespace(lr=0.1), "curve": np.arange(3.0)}, tmp_path / "np.pth")
    _, meta = read_checkpoint(tmp_path / "np.pth")
    assert meta == {"best_acc": 91.5, "epoch": 7}


def test_not_a_pickle_is_unreadable_not_unsafe(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read") as err:
        read_checkpoint(tmp_path / "junk.pt", allow_unsafe_pickle=True)
    assert "allow_unsafe_pickle" not in str(err.value)


@pytest.mark.parametrize("name", REAL)
def test_shared_real_checkpoints_need_no_full_unpickling(shared_dir, name):
    """They load with weights_only=True as is (tensors and plain values only)."""
    obj = torch.load(shared_dir / "weights" / name, map_location="cpu", weights_only=True)
    assert isinstance(obj["state_dict"], dict)
    read_checkpoint(shared_dir / "weights" / name)  # the default path: no opt-in
