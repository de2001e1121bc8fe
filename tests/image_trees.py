"""Small image trees in the official download layouts, written by the tests that read them
(tests/test_readers_224.py, tests/test_cub_job.py): one flat colour per class; and the inputs
of a tiny run of jobs/cub200_paper.yaml (tests/test_cub_job.py, tests/test_distributed_ray.py)."""

import random
from pathlib import Path

from PIL import Image

CUB_JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "cub200_paper.yaml")

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "010.Red_winged_Blackbird"]
# Mixed case and digit runs: the order must be Python's string order, as ImageFolder sorts.
CUB_FILES = ["Bird_0010_5.jpg", "Bird_0002_77.jpg", "bird_0001_1.jpg", "Bird_0001_9.jpg", "Bird_0100_3.jpg"]


def write_jpeg(path, colour, side=12):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side + len(path.name) % 5, side), colour).save(path, quality=95)


def write_cub(root):
    """CUB_200_2011/ as in the .tgz; images.txt in shuffled id order. Returns (folder, {id: (rel, train, class)});
    the images named CUB_FILES[3] are the test split (one per class)."""
    folder = root / "CUB_200_2011"
    rels = [f"{c}/{c.split('.')[1]}_{f}" for c in CUB_CLASSES for f in CUB_FILES]
    random.Random(3).shuffle(rels)
    meta = {}
    for i, rel in enumerate(rels, 1):
        cls = rel.split("/")[0]
        meta[i] = (rel, not rel.endswith(CUB_FILES[3]), cls)
        write_jpeg(folder / "images" / rel, COLOURS[CUB_CLASSES.index(cls)])
    (folder / "images.txt").write_text("".join(f"{i} {rel}\n" for i, (rel, _, _) in meta.items()))
    (folder / "train_test_split.txt").write_text("".join(f"{i} {int(tr)}\n" for i, (_, tr, _) in meta.items()))
    (folder / "classes.txt").write_text("".join(f"{k} {c}\n" for k, c in enumerate(CUB_CLASSES, 1)))
    (folder / "image_class_labels.txt").write_text(
        "".join(f"{i} {CUB_CLASSES.index(c) + 1}\n" for i, (_, _, c) in meta.items()))
    return folder, meta


def write_cub_job_inputs(root):
    """What a user brings to jobs/cub200_paper.yaml, under root: data/CUB_200_2011/ (9 train, 3 val,
    3 test images at data.val_fraction=0.25) and a random torchvision ResNet34 as a plain state_dict."""
    import torch
    import torchvision

    write_cub(root / "data")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34().state_dict(), root / "resnet34-b627a593.pth")
    return root


def tiny_cub_run(root, out_dir, name, **extra) -> list[str]:
    """The overrides of a tiny run of jobs/cub200_paper.yaml on write_cub_job_inputs(root): the
    user's paths, no official split files, 32x32 streamed, batch 4, 2 epochs of 2 iterations."""
    over = {"data.path": root / "data", "sources.0.checkpoint": root / "resnet34-b627a593.pth",
            "data.official_splits": "null", "data.val_fraction": 0.25, "data.image_size": 32, "data.pipeline": "stream",
            "data.batch_size": 4, "data.eval_batch_size": 8, "optim.epochs": 2, "run.max_iters_per_epoch": 2,
            "run.out_dir": out_dir, "run.name": name, "run.threads": 1, "tracking.enabled": "false", **extra}
    return [f"{k}={v}" for k, v in over.items()]
