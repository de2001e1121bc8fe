"""The one-process trainer on small synthetic jobs: exact resume, NaN handling, outputs."""

import json
import subprocess
import sys

import pytest
import torch

from l2t_dist.config import parse_job
from l2t_dist.errors import ConfigError, TrainingError
from l2t_dist.train.local import train_local
from l2t_dist.train.loop import TrainingLoop
from l2t_dist.train.state import TrainingState


def small_job(tmp_path, source_ckpt, **over):
    tree = {
        "data": {"kind": "synthetic", "path": "task=c,classes=4,per_class=12,size=16,seed=0",
                 "batch_size": 16, "eval_batch_size": 64},
        "sources": [{"name": "s", "arch": "resnet20", "checkpoint": source_ckpt}],
        "target": {"arch": "resnet20"},
        "method": {"name": "l2t_ww", "T": 1, "beta": 0.5},
        "optim": {"lr": 0.05, "epochs": 2},
        "meta": {"lr": 1e-2},
        "run": {"name": "r", "out_dir": str(tmp_path), "seed": 3, "threads": 1},
    }
    for dotted, value in over.items():
        section, key = dotted.split("__")
        tree.setdefault(section, {})[key] = value
    return parse_job(tree)


def _state(run_dir):
    state = TrainingState.load(run_dir / "last.pt")
    return state.student, state.phi


def _log(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("images_per_s")
    return rows


class Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", ["epoch", "mid-epoch"])
def test_resume_continues_the_same_trajectory(tmp_path, source_ckpt, monkeypatch, stop_at):
    straight = train_local(small_job(tmp_path / "a", source_ckpt, run__checkpoint_every=1))
    ref_student, ref_phi = _state(tmp_path / "a" / "r")

    job = small_job(tmp_path / "b", source_ckpt, run__checkpoint_every=1)
    calls = {"n": 0}
    original_step = TrainingLoop._train_epoch if stop_at == "epoch" else None

    if stop_at == "epoch":
        def interrupted(self, n):
            if self.epoch == 1:
                raise Stop
            return original_step(self, n)
        monkeypatch.setattr(TrainingLoop, "_train_epoch", interrupted)
    else:
        from l2t_dist.method import L2TStep
        real_call = L2TStep.step

        def interrupted(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 4:  # epoch 2, second batch: the checkpoint after batch 1 is the resume point
                raise Stop
            return real_call(self, *a, **k)
        monkeypatch.setattr(L2TStep, "step", interrupted)
        monkeypatch.setattr(L2TStep, "__call__", interrupted)
    with pytest.raises(Stop):
        train_local(job)
    monkeypatch.undo()
    resumed = train_local(None, resume=str(tmp_path / "b" / "r"))
    student, phi = _state(tmp_path / "b" / "r")
    assert student.keys() == ref_student.keys()
    for k in ref_student:
        assert torch.equal(student[k], ref_student[k]), k
    for k in ref_phi:
        assert torch.equal(phi[k], ref_phi[k]), k
    assert _log(tmp_path / "b" / "r") == _log(tmp_path / "a" / "r")
    assert resumed.epochs == straight.epochs == 2
    assert resumed.best_val_acc == straight.best_val_acc


def _recount(model, x, y):
    """Accuracy (%) of a model on uint8 images, computed here, apart from the trainer."""
    from l2t_dist.data import normalize

    with torch.no_grad():
        return 100.0 * int((model.eval()(normalize(x)).argmax(1) == y).sum()) / len(y)


def test_outputs_and_best_checkpoint_serves_as_source(tmp_path, source_ckpt):
    from l2t_dist.sources.zoo import load_source
    from l2t_dist.train.data_pipeline import prepare_data

    job = small_job(tmp_path, source_ckpt, method__name="fm", optim__epochs=1)
    summary = train_local(job)
    run_dir = tmp_path / "r"
    assert (run_dir / "job.yaml").exists() and (run_dir / "best.pt").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["step"] == 3  # 44 images, batches of 16
    model, meta = load_source(str(run_dir / "best.pt"), "resnet20")
    # the logged accuracies are those of the saved model on the held-out splits, recounted here
    d = prepare_data(job.data)
    assert (len(d.val_y), len(d.test_y)) == (4, 48)
    assert rows[0]["val_acc"] == _recount(model, d.val_x, d.val_y) == summary.best_val_acc
    assert rows[0]["test_acc"] == _recount(model, d.test_x, d.test_y) == summary.test_acc_at_best_val
    assert model.num_classes == 4 and meta["epoch"] == 1


def test_a_checkpoint_of_another_state_version_is_refused_clearly(tmp_path, source_ckpt):
    from l2t_dist.errors import CheckpointError

    train_local(small_job(tmp_path, source_ckpt, method__name="scratch", optim__epochs=1))
    obj = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert obj["trainer"]["version"] == 2
    del obj["trainer"]["version"]  # the untyped layout of earlier releases
    torch.save(obj, tmp_path / "r" / "last.pt")
    with pytest.raises(CheckpointError, match="version 1.*reads version 2"):
        train_local(None, resume=str(tmp_path / "r"))


def test_existing_run_dir_is_not_overwritten(tmp_path, source_ckpt):
    job = small_job(tmp_path, source_ckpt, method__name="scratch", optim__epochs=1)
    train_local(job)
    before = (tmp_path / "r" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="--resume"):
        train_local(job)
    assert (tmp_path / "r" / "last.pt").read_bytes() == before


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, source_ckpt):
    job = small_job(tmp_path, source_ckpt, method__name="scratch", optim__epochs=3)
    train_local(job.model_copy(update={"optim": job.optim.model_copy(update={"epochs": 1})}))
    good = (tmp_path / "r" / "last.pt").read_bytes()
    resumed_job = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    resumed_job["trainer"]["job"]["optim"]["epochs"] = 3
    resumed_job["trainer"]["job"]["optim"]["lr"] = 1e12  # diverges at once
    torch.save(resumed_job, tmp_path / "r" / "last.pt")
    good = (tmp_path / "r" / "last.pt").read_bytes()
    with pytest.raises(TrainingError) as err:
        train_local(None, resume=str(tmp_path / "r"))
    assert "non-finite" in str(err.value) and "last.pt" in str(err.value)
    assert (tmp_path / "r" / "last.pt").read_bytes() == good


def test_cli_train_exit_codes(tmp_path, source_ckpt):
    cmd = [sys.executable, "-m", "l2t_dist.cli", "train", "--quiet", "--json",
           "data.kind=synthetic", "data.path=task=c,classes=3,per_class=8,size=16", "data.batch_size=8",
           "target.arch=resnet20", "method.name=scratch", "optim.epochs=1", "tracking.enabled=false",
           f"run.out_dir={tmp_path}"]  # tracking off: no mlflow.db in the working directory
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 1 and summary["method"] == "scratch"
    bad = subprocess.run(cmd[:-1] + ["method.bta=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "method.bta" in bad.stderr and "Traceback" not in bad.stderr
    failure = json.loads(bad.stdout.strip().splitlines()[-1])  # --json: the failure as the last line
    assert failure["exit_code"] == 2 and failure["kind"] == "ConfigError" and "method.bta" in failure["error"]


@pytest.mark.parametrize("over,error,needle", [
    ({"target__taps": ["layer9.9"]}, ConfigError, "layer9.9"),
    ({"data__kind": "cifar10", "data__path": "/nonexistent/cifar"}, "DataError", "cifar-10-batches-py"),
    ({"method__pairs": [["s:layer3.2", "layer7.0"]]}, ConfigError, "layer7.0"),
])
def test_bad_job_inputs_fail_before_training_with_clear_errors(tmp_path, source_ckpt, over, error, needle):
    from l2t_dist.errors import DataError

    error = DataError if error == "DataError" else error
    with pytest.raises(error) as err:
        train_local(small_job(tmp_path, source_ckpt, **over))
    assert needle in str(err.value)
    assert not (tmp_path / "r" / "last.pt").exists()


def test_missing_source_checkpoint_is_a_clear_error(tmp_path, source_ckpt):
    from l2t_dist.errors import CheckpointError

    job = small_job(tmp_path, source_ckpt)
    job.sources[0].checkpoint = str(tmp_path / "gone.pt")
    with pytest.raises(CheckpointError, match="gone.pt"):
        train_local(job)


@pytest.mark.parametrize("method,pairs", [("lwf", None), ("at", None), ("fm", "one_to_one"), ("l2t_w", None),
                                          ("l2t_ww", [["s:2", "5"], ["s:layer3.2", "layer3.2"]])])
def test_every_method_trains_from_a_job(tmp_path, source_ckpt, method, pairs):
    over = {"method__name": method, "optim__epochs": 1}
    if pairs is not None:
        over["method__pairs"] = pairs
    summary = train_local(small_job(tmp_path, source_ckpt, **over))
    [row] = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert summary.epochs == 1 and summary.best_val_acc == row["val_acc"] == summary.final_val_acc
    assert summary.test_acc_at_best_val == row["test_acc"] and summary.best_epoch == 1
    state = TrainingState.load(tmp_path / "r" / "last.pt")
    assert (state.phi is not None) == method.startswith("l2t") and state.global_step == 3
    assert summary.method == method and bool(summary.pairs) == method.startswith("l2t")
    if method == "l2t_ww" and pairs is not None:
        assert sorted(summary.pairs) == ["s:layer1.2->layer2.2", "s:layer3.2->layer3.2"]
