"""Method `finetune`: the target starts from a checkpoint of its own architecture (target.checkpoint)
with a new classifier head, and trains like scratch. The weights are the checkpoint's but for
the head; a checkpoint that does not fit is listed key by key; the job schema refuses a finetune
job without a checkpoint, or with sources; `l2t-dist job` reads no checkpoint."""

import pytest
import torch

from l2t_dist.cli import main
from l2t_dist.config import parse_job
from l2t_dist.errors import CheckpointError, ConfigError
from l2t_dist.models import build_model
from l2t_dist.sources.zoo import read_checkpoint, save_model_checkpoint
from l2t_dist.train.build import build_trainee
from l2t_dist.train.local import train_local
from l2t_dist.train.state import TrainingState

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")
TIN = "l2tww_tinyimagenet200_resnet32_model_best.pth.tar"


def job(tmp_path, ckpt=None, arch="resnet20", method="finetune", **sections) -> dict:
    tree = {"data": {"kind": "synthetic", "path": "task=c,classes=3,per_class=10,size=16,seed=0", "image_size": 16,
                     "batch_size": 8, "eval_batch_size": 64},
            "target": {"arch": arch, **({"checkpoint": str(ckpt)} if ckpt else {})},
            "method": {"name": method}, "optim": {"lr": 0.05, "epochs": 1},
            "run": {"name": "ft", "out_dir": str(tmp_path / "runs"), "seed": 3, "threads": 1},
            "tracking": {"enabled": False}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    """A torchvision-style file: a bare state_dict (DataParallel's `module.` prefix), 7 classes."""
    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("ft") / "resnet20_7.pth"
    torch.save({f"module.{k}": v for k, v in build_model("resnet20", 7).state_dict().items()}, path)
    return path


def _target_after_build(tree, num_classes=3):
    torch.manual_seed(5)
    return build_trainee(parse_job(tree), num_classes, CPU).target


def _assert_checkpoint_but_head(target, ckpt, head=("linear.weight", "linear.bias"), unsafe=False):
    sd, _ = read_checkpoint(ckpt, allow_unsafe_pickle=unsafe)
    own = target.state_dict()
    assert set(own) - set(head) == set(sd) - set(head)
    assert all(torch.equal(own[k], sd[k]) for k in own if k not in head)
    assert all(own[k].shape != sd[k].shape for k in head)


def test_weights_are_the_checkpoints_but_a_new_head(tmp_path, plain_ckpt):
    target = _target_after_build(job(tmp_path, plain_ckpt))
    _assert_checkpoint_but_head(target, plain_ckpt)
    assert target.linear.weight.shape == (3, 64) and target.num_classes == 3
    # The head is the fresh one that scratch draws from the same seed: reading the checkpoint
    # (and finding the head) leaves the random-number state alone.
    scratch = _target_after_build(job(tmp_path, method="scratch"))
    assert torch.equal(target.linear.weight, scratch.linear.weight)
    assert torch.equal(target.linear.bias, scratch.linear.bias)
    assert not torch.equal(target.layer1[0].conv1.weight, scratch.layer1[0].conv1.weight)


def test_torchvision_state_dict_into_tv_resnet18(tmp_path):
    """The paper's 224 target: a torchvision ImageNet-style state_dict (1000 classes) into tv:resnet18."""
    torch.manual_seed(0)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(build_model("tv:resnet18", 1000).state_dict(), path)
    target = _target_after_build(job(tmp_path, path, arch="tv:resnet18", data={"image_size": 64}), num_classes=5)
    _assert_checkpoint_but_head(target, path, head=("fc.weight", "fc.bias"))
    assert target.fc.weight.shape == (5, 512)


def test_the_l2tww_tinyimagenet_checkpoint(tmp_path, shared_dir):
    """The study's finetune runs: the paper's TinyImageNet ResNet32 (200 classes) into a 10-class l2t_resnet32."""
    path = shared_dir / "weights" / TIN
    target = _target_after_build(job(tmp_path, path, arch="l2t_resnet32"), num_classes=10)
    _assert_checkpoint_but_head(target, path, head=("fc.weight", "fc.bias"))
    assert target.fc.weight.shape == (10, 64)


def test_a_checkpoint_that_does_not_fit_lists_the_keys(tmp_path, plain_ckpt):
    with pytest.raises(CheckpointError) as err:  # resnet20 weights into a resnet32
        _target_after_build(job(tmp_path, plain_ckpt, arch="resnet32"))
    msg = str(err.value)
    assert msg.startswith(f"target.checkpoint '{plain_ckpt}' (all keys but the classifier head linear.weight, "
                          "linear.bias must fit): checkpoint does not fit resnet32: 60 missing keys: layer1.3.")
    assert msg.endswith("Hint: the checkpoint looks like arch 'resnet20'; set target.arch to 'resnet20'")
    # one wrongly shaped and one unexpected key, the head's shape being no concern
    sd = {k: v for k, v in build_model("resnet20", 7).state_dict().items()}
    sd["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        _target_after_build(job(tmp_path, tmp_path / "bad.pth"))
    msg = str(err.value)
    assert "1 unexpected keys: extra.weight; 1 wrongly shaped keys: conv1.weight (8, 3, 3, 3) in checkpoint " \
           "vs (16, 3, 3, 3) in model" in msg and "missing" not in msg


def test_an_l2tdist_checkpoint_of_another_arch_is_refused(tmp_path):
    save_model_checkpoint(tmp_path / "vgg.pt", build_model("vgg9_bn", 4), "vgg9_bn")
    with pytest.raises(CheckpointError, match=r"was saved from arch 'vgg9_bn' but target.arch is 'resnet20'; "
                                              r"set target.arch=vgg9_bn"):
        _target_after_build(job(tmp_path, tmp_path / "vgg.pt"))


def test_one_epoch_run_is_scratch_from_the_checkpoint(tmp_path, plain_ckpt):
    """finetune trains exactly as scratch does from the same starting weights: same θ after an
    epoch (scratch with target.checkpoint is that), and a different θ from a random start."""
    fine = train_local(parse_job(job(tmp_path, plain_ckpt, run={"name": "ft"})), quiet=True)
    train_local(parse_job(job(tmp_path, plain_ckpt, method="scratch", run={"name": "sc"})), quiet=True)
    train_local(parse_job(job(tmp_path, method="scratch", run={"name": "rand"})), quiet=True)
    assert fine.method == "finetune" and fine.epochs == 1 and 0.0 <= fine.best_val_acc <= 100.0
    states = {n: TrainingState.load(tmp_path / "runs" / n / "last.pt").target for n in ("ft", "sc", "rand")}
    assert all(torch.equal(states["ft"][k], states["sc"][k]) for k in states["ft"])
    assert not torch.equal(states["ft"]["conv1.weight"], states["rand"]["conv1.weight"])
    assert states["ft"]["linear.weight"].shape == (3, 64)
    assert TrainingState.load(tmp_path / "runs" / "ft" / "last.pt").phi is None  # no meta-networks


def test_validation_errors(tmp_path, plain_ckpt):
    with pytest.raises(ConfigError, match=r"method 'finetune' starts the target from a pretrained checkpoint: set "
                                          r"target.checkpoint=PATH"):
        parse_job(job(tmp_path))
    source = {"name": "tin", "arch": "resnet20", "checkpoint": "x.pt"}
    with pytest.raises(ConfigError, match=r"method 'finetune' uses no sources, but the job lists tin; remove them "
                                          r"\(sources=\[\] on the command line\)"):
        parse_job({**job(tmp_path, plain_ckpt), "sources": [source]})
    # every other method may start its target from a checkpoint too
    tree = {**job(tmp_path, plain_ckpt, method="l2t_ww"), "sources": [source]}
    assert parse_job(tree).target.checkpoint == str(plain_ckpt)


def test_job_reads_no_checkpoint_and_train_fails_clearly_on_a_missing_one(tmp_path, capsys):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(tmp_path, tmp_path / "not-there.pth")))
    assert main(["job", str(path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["target"]["checkpoint"] == str(tmp_path / "not-there.pth")
    assert main(["train", str(path), "--quiet"]) == 2
    assert f"checkpoint '{tmp_path / 'not-there.pth'}' does not exist" in capsys.readouterr().err


def test_unsafe_pickle_needs_the_targets_own_opt_in(tmp_path):
    import argparse  # allowed by the safe reader; a set() of a class is not
    path = tmp_path / "with_objects.pth"
    torch.save({"state_dict": build_model("resnet20", 7).state_dict(), "args": argparse.ArgumentParser}, path)
    with pytest.raises(CheckpointError, match="allow_unsafe_pickle"):
        _target_after_build(job(tmp_path, path))
    target = _target_after_build(job(tmp_path, path, target={"allow_unsafe_pickle": True}))
    _assert_checkpoint_but_head(target, path, unsafe=True)


def test_tune_trials_get_an_absolute_target_checkpoint(tmp_path, plain_ckpt, monkeypatch):
    """Trials run in Tune's own folders: a relative target.checkpoint must not move with them."""
    from l2t_dist.tune.sweep import _absolute

    monkeypatch.chdir(plain_ckpt.parent)
    tree = _absolute(parse_job(job(tmp_path, plain_ckpt.name)).model_dump(mode="json"))
    assert tree["target"]["checkpoint"] == str(plain_ckpt.resolve())
