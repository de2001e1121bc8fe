"""`l2t-dist job` checks what train would build from the job alone (l2t_dist/validate.py):
taps, pairs and presets against the architectures, without data or checkpoints. Each bad job
must fail there with exit 2 and exactly the message that `l2t-dist train` gives for it."""

import pytest
import yaml

from l2t_dist.cli import main


def _job(tmp_path, ckpt, **method) -> dict:
    return {"data": {"kind": "synthetic", "path": "task=c,classes=3,per_class=6,size=16,seed=0", "image_size": 16,
                     "batch_size": 8},
            "sources": [{"name": "src", "arch": "resnet20", "checkpoint": ckpt, "taps": [2, 8]}],
            "target": {"arch": "resnet20"}, "method": {"name": "l2t_ww", "T": 1, **method},
            "optim": {"epochs": 1}, "run": {"name": "v", "out_dir": str(tmp_path / "runs"), "threads": 1,
                                             "max_iters_per_epoch": 1},
            "tracking": {"enabled": False}}


def _run(capsys, argv) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


BAD = {
    "unknown source tap": ["sources.0.taps=[99]"],
    "unknown target tap": ["target.taps=[conv9]"],
    "pair names an unknown source": ['method.pairs=[["zz:2", "8"]]'],
    "pair names an unknown source tap": ['method.pairs=[["src:99", "8"]]'],
    "pair names an unknown target tap": ['method.pairs=[["src:2", "12"]]'],
    # one_to_one pairs equal sizes: src taps 2 (16x16) and 8 (4x4) against target tap 5 (8x8) alone
    "preset that cannot be formed": ["method.pairs=one_to_one", "target.taps=[5]"],
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_bad_taps_and_pairs_fail_in_job_with_trains_message(what, tmp_path, source_ckpt, capsys, single_thread):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(tmp_path, source_ckpt)))
    code, out, err = _run(capsys, ["job", str(path), *BAD[what]])
    assert code == 2 and out == "", (what, out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    # train (local backend: it loads the data and the checkpoint first) stops with the same words
    code_train, _, err_train = _run(capsys, ["train", str(path), *BAD[what], "--quiet"])
    assert code_train == 2 and err_train == err, (what, err_train, err)
    assert not (tmp_path / "runs" / "v" / "last.pt").exists()


def test_job_needs_no_data_and_no_checkpoint(tmp_path, capsys, single_thread):
    """The checks build the architectures without weights: a checkpoint that is not there and a
    dataset folder that does not exist are no obstacle, and the job is printed in full."""
    tree = _job(tmp_path, str(tmp_path / "not-there.pt"))
    tree["data"] = {"kind": "cifar10", "path": str(tmp_path / "no-cifar"), "image_size": 16}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    code, out, err = _run(capsys, ["job", str(path), 'method.pairs=[["src:2", "2"], ["src:layer3.2", "stage3"]]',
                                   "target.arch=vgg9_bn"])
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["method"]["pairs"] == [["src:2", "2"], ["src:layer3.2", "stage3"]]
    assert printed["sources"][0]["checkpoint"] == str(tmp_path / "not-there.pt")


def test_checks_leave_the_callers_torch_state_alone():
    import torch

    from l2t_dist.config import parse_job
    from l2t_dist.validate import check_job

    job = parse_job({"sources": [{"name": "s", "arch": "resnet20", "checkpoint": "x.pt", "taps": [2]}],
                     "target": {"arch": "resnet20"}, "data": {"image_size": 16}})
    torch.manual_seed(123)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    trainee = check_job(job)
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    # the skeleton is train's own Trainee: the default all_to_all pairs of the offered taps
    assert [p.name for p in trainee.pairs] == ["s:layer1.2->layer1.2", "s:layer1.2->layer2.2",
                                               "s:layer1.2->layer3.2"]
