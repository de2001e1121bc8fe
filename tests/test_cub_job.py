"""Issue 14's acceptance, as a user runs it: jobs/cub200_paper.yaml on a small CUB-200-2011 tree
in the official layout, with a random torchvision ResNet34 saved as a plain state_dict (what
resnet34-b627a593.pth is), through `l2t-dist train` with overrides for a tiny run (32x32,
streamed, batch 4, 2 iterations per epoch). It trains on the CPU, evaluates, checkpoints and
resumes exactly; the bad inputs of the acceptance list fail before training, with what to fix.
The `--backend ray` run of the same job is in tests/test_distributed_ray.py (its cluster)."""

import contextlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from image_trees import CUB_JOB as JOB
from image_trees import tiny_cub_run as tiny
from image_trees import write_cub_job_inputs

from l2t_dist.cli import main


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    """The tree (9 train, 3 val, 3 test images, 3 classes) and the source's state_dict."""
    return write_cub_job_inputs(tmp_path_factory.mktemp("cub"))


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def rows(run_dir: Path) -> list[dict]:
    out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in out]


def test_paper_job_trains_evaluates_checkpoints_and_resumes_exactly(cub, tmp_path, monkeypatch):
    from l2t_dist.sources.zoo import load_source
    from l2t_dist.train.loop import TrainingLoop
    from l2t_dist.train.state import TrainingState

    code, out, err = cli("train", JOB, *tiny(cub, tmp_path, "straight", **{"data.decode_workers": 0}),
                         "--quiet", "--json")
    assert code == 0, err
    straight = json.loads(out.strip().splitlines()[-1])
    assert straight["epochs"] == 2 and len(straight["pairs"]) == 16  # layer1-4 x layer1-4
    assert all(math.isfinite(straight[k]) for k in ("best_val_acc", "test_acc_at_best_val", "final_test_acc"))
    run_a = tmp_path / "straight"
    assert [(r["epoch"], r["step"]) for r in rows(run_a)] == [(1, 2), (2, 4)]
    # the trained target is a source checkpoint of tv:resnet18 (3 classes), loaded strictly
    assert load_source(run_a / "best.pt", "tv:resnet18")[0].num_classes == 3

    # Ctrl-C at the start of epoch 2 (2 decode workers this time), then --resume
    original = TrainingLoop._train_epoch

    def interrupted(self, *args):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(TrainingLoop, "_train_epoch", interrupted)
    code, _, err = cli("train", JOB, *tiny(cub, tmp_path, "stopped"), "--quiet")
    assert code == 130 and "the last checkpoint is kept" in err, err
    monkeypatch.undo()
    run_b = tmp_path / "stopped"
    assert TrainingState.load(run_b / "last.pt").epoch == 1
    code, out, err = cli("train", "--resume", str(run_b), "--quiet", "--json")
    assert code == 0, err
    resumed = json.loads(out.strip().splitlines()[-1])

    a, b = TrainingState.load(run_a / "last.pt"), TrainingState.load(run_b / "last.pt")
    assert a.global_step == b.global_step == 4 and a.student.keys() == b.student.keys() and a.phi
    for part in ("student", "phi"):
        for k, v in getattr(a, part).items():
            assert torch.equal(v, getattr(b, part)[k]), (part, k)
    assert rows(run_a) == rows(run_b)
    for k in ("best_val_acc", "test_acc_at_best_val", "final_val_acc", "final_test_acc", "best_epoch", "pairs"):
        assert resumed[k] == straight[k], k


BAD_JOBS = {  # `l2t-dist job`: no data, no weights; exit 2 with the name of what is wrong
    "unknown torchvision name": (["target.arch=tv:resnet19"],
                                 "unknown torchvision model 'resnet19'.*close matches: tv:resnet18"),
    "unknown timm name": (["sources.0.arch=timm:resnet35"],
                          "unknown timm model 'resnet35'.*close matches:.*timm:resnet34"),
    "source tap not in the model": (["sources.0.taps=[layer1,layer5]"],
                                    "unknown tap 'layer5' for tv:resnet34.*layer4.*sources inspect"),
    "target tap not in the model": (["target.taps=[layer1,fc2]"], "unknown tap 'fc2' for tv:resnet18"),
}


@pytest.mark.parametrize("what", sorted(BAD_JOBS))
def test_bad_names_and_taps_fail_in_job_validation(what, cub, tmp_path):
    overrides, match = BAD_JOBS[what]
    code, out, err = cli("job", JOB, *tiny(cub, tmp_path, "v"), *overrides)
    assert code == 2 and out == "", (what, err)
    assert err.startswith("error: ") and re.search(match, err), (what, err)


def _another_architecture(root, tmp_path):
    import torchvision

    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return [f"sources.0.checkpoint={path}"], r"missing keys.*layer1\.2\.conv1\.weight"


def _missing_split_file(root, tmp_path):
    return ([f"data.official_splits={tmp_path / 'splits' / 'cub200'}"],
            r"data.official_splits=.*: expected files .*splits/cub200-train and .*splits/cub200-val")


def _missing_list_file(root, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(root / "data", copy)
    (copy / "CUB_200_2011" / "train_test_split.txt").unlink()
    return [f"data.path={copy}"], "train_test_split.txt is missing.*Expected layout for data.kind=cub200"


@pytest.mark.parametrize("bad", [_another_architecture, _missing_split_file, _missing_list_file],
                         ids=["checkpoint of another architecture", "missing split file", "missing list file"])
def test_bad_files_fail_before_training(bad, cub, tmp_path):
    overrides, match = bad(cub, tmp_path)
    code, _, err = cli("train", JOB, *tiny(cub, tmp_path, "bad"), *overrides, "--quiet")
    assert code == 2 and re.search(match, err, flags=re.S), err
    assert not (tmp_path / "bad" / "last.pt").exists() and not (tmp_path / "bad" / "metrics.jsonl").exists()
