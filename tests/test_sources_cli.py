"""`l2t-dist sources inspect|eval` as a user runs them, with the published accuracies as goldens."""

import json
import subprocess
import sys

import pytest

from l2t_dist.cli import main

TIN = "weights/l2tww_tinyimagenet200_resnet32_model_best.pth.tar"
R20 = "weights/akamaster_cifar10_resnet20-12fca82f.th"
R32 = "weights/akamaster_cifar10_resnet32-d509ac18.th"


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_tinyimagenet_source_golden_accuracy(shared_dir):
    """The L2T-ww source scores 49.13% (published 49.15%) on the 10k val images at 32x32."""
    out = subprocess.run([sys.executable, "-m", "l2t_dist.cli", "sources", "eval", str(shared_dir / TIN),
                          "--arch", "l2t_resnet32", "--data", f"tinyimagenet:{shared_dir}/data/tiny-imagenet-200",
                          "--split", "val", "--image-size", "32", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 10000
    assert abs(result["top1"] - 49.1) <= 0.2


@pytest.mark.parametrize("ckpt,arch,golden", [(R20, "resnet20", 91.6), (R32, "resnet32", 92.8)])
def test_akamaster_golden_accuracy(shared_dir, capsys, ckpt, arch, golden):
    result = run_json(capsys, ["sources", "eval", str(shared_dir / ckpt), "--arch", arch,
                               "--data", f"parquet:{shared_dir}/data/cifar10-exact-subset", "--split", "test",
                               "--json"])
    assert result["n"] == 1017
    assert abs(result["top1"] - golden) <= 0.3


def test_eval_on_heldout_part_uses_protocol_split(shared_dir, capsys):
    data = ["--data", f"parquet:{shared_dir}/data/cifar10-exact-subset", "--split", "train"]
    val = run_json(capsys, ["sources", "eval", str(shared_dir / R20), "--arch", "resnet20", *data,
                            "--holdout", "val", "--json"])
    from l2t_dist.data import class_balanced_split, open_dataset

    targets = open_dataset("parquet", f"{shared_dir}/data/cifar10-exact-subset", "train").targets
    assert val["n"] == len(class_balanced_split(targets, val_fraction=0.1, seed=0)[1])
    assert 500 <= val["n"] <= 520  # 10% of 5085
    assert val["top1"] > 90.0  # it was trained on these images


def test_inspect_checkpoint_lists_taps_and_metadata(shared_dir, capsys):
    report = run_json(capsys, ["sources", "inspect", str(shared_dir / TIN), "--arch", "l2t_resnet32", "--json"])
    assert report["num_classes"] == 200 and report["meta"]["test_prec"] == pytest.approx(49.15)
    taps = report["taps"]
    assert len(taps) == 15
    assert [(t["channels"], t["height"]) for t in (taps[4], taps[9], taps[14])] == [(16, 32), (32, 16), (64, 8)]


def test_inspect_builtin_architecture_without_checkpoint(capsys):
    report = run_json(capsys, ["sources", "inspect", "--arch", "vgg9_bn", "--json"])
    assert [(t["name"], t["channels"], t["height"]) for t in report["taps"]] == [
        ("stage0", 64, 32), ("stage1", 128, 16), ("stage2", 256, 8), ("stage3", 512, 4), ("stage4", 512, 2)]


def test_mismatched_checkpoint_is_a_clear_error(shared_dir, capsys):
    assert main(["sources", "inspect", str(shared_dir / R20), "--arch", "resnet32"]) == 2
    err = capsys.readouterr().err
    assert "missing keys" in err and "layer1.3.conv1.weight" in err and "resnet20" in err


def test_missing_dataset_shows_expected_layout(tmp_path, shared_dir, capsys):
    code = main(["sources", "eval", str(shared_dir / R20), "--arch", "resnet20",
                 "--data", f"cifar10:{tmp_path}/nowhere", "--split", "test"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "cifar-10-batches-py" in err


def test_bad_data_spec(capsys):
    assert main(["sources", "eval", "x.pt", "--arch", "resnet20", "--data", "cifar10", "--split", "test"]) == 2
    assert "KIND:PATH" in capsys.readouterr().err
