"""The streaming input pipeline at 224x224: images/s per decode worker count, and the share of a
training step spent waiting for its batch (JSON output).

Writes a real JPEG tree in the CUB-200-2011 download layout (500x375 images, JPEG quality 75,
smooth random content: the file sizes and decode cost of photographs rather than of noise),
then:
- decode: images/s of StreamingData.train_shards (decode + RandomResizedCrop(224) + flip per
  image, in DataLoader workers) over one epoch, for each data.decode_workers asked for, in
  ABBA order; `images_per_s` counts from the first request (worker start-up included),
  `steady_images_per_s` from the first batch on;
- train (--train-methods): a streaming training run (TrainingLoop, colocated sources) on that
  tree with data.decode_workers=--train-workers, whose TaskPipeline is wrapped to time how long
  each step waits for its batch: `input_wait_share` = (time blocked on the pipeline) / (that +
  the loop's step time); `loop_wait_fraction` is the loop's own wait_fraction (the time it
  waits for source FEATURES: with colocated sources, computing them; not the input).

    python benchmarks/input_pipeline.py --json benchmarks/results/input_pipeline_224.json

Compare `images_per_s` with what a step consumes (benchmarks/step_throughput.py at 224).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def write_tree(root: Path, classes: int, per_class: int, test_per_class: int, size=(500, 375)) -> dict:
    """CUB_200_2011/ with images/, images.txt, train_test_split.txt, classes.txt."""
    import numpy as np
    from PIL import Image

    folder = root / "CUB_200_2011"
    rng = np.random.default_rng(0)
    lines, flags, names, nbytes = [], [], [], 0
    for c in range(classes):
        name = f"{c + 1:03d}.Class_{c}"
        names.append(name)
        (folder / "images" / name).mkdir(parents=True)
        for i in range(per_class + test_per_class):
            low = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)  # smooth content, upsampled
            img = Image.fromarray(low).resize(size, Image.BICUBIC)
            pixels = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(size[1], size[0], 3)),
                             0, 255).astype(np.uint8)
            rel = f"{name}/img_{i:04d}.jpg"
            Image.fromarray(pixels).save(folder / "images" / rel, quality=75)
            nbytes += (folder / "images" / rel).stat().st_size
            lines.append(rel)
            flags.append(int(i < per_class))
    (folder / "images.txt").write_text("".join(f"{k} {r}\n" for k, r in enumerate(lines, 1)))
    (folder / "train_test_split.txt").write_text("".join(f"{k} {f}\n" for k, f in enumerate(flags, 1)))
    (folder / "classes.txt").write_text("".join(f"{k} {n}\n" for k, n in enumerate(names, 1)))
    return {"images": len(lines), "mean_jpeg_bytes": nbytes / len(lines), "size": list(size), "classes": classes}


def data_cfg(root: Path, batch: int, image_size: int, workers: int):
    from l2t_dist.config import DataConfig

    return DataConfig(kind="cub200", path=str(root), image_size=image_size, batch_size=batch, eval_batch_size=batch,
                      pipeline="stream", decode_workers=workers, val_fraction=0.1)


def time_decode(root: Path, batch: int, image_size: int, workers: int) -> dict:
    """One epoch of train_shards: seconds to the first batch, and the images/s."""
    from l2t_dist.train.data_pipeline import open_data

    data = open_data(data_cfg(root, batch, image_size, workers))
    t0 = time.perf_counter()
    first, images, n0 = None, 0, 0
    for _, x, _, _ in data.train_shards(0, 0, 0, 10**9, lambda n: (0, n)):
        images += len(x)
        if first is None:
            first, n0 = time.perf_counter(), images
    total = time.perf_counter() - t0
    return {"images": images, "s": total, "first_batch_s": first - t0, "images_per_s": images / total,
            "steady_images_per_s": (images - n0) / max(1e-9, total - (first - t0))}


class TimedPipeline:
    """A TaskPipeline that records how long each train batch keeps the loop waiting."""

    def __init__(self, inner):
        self.inner, self.num_classes, self.waits = inner, inner.num_classes, []

    def sizes(self):
        return self.inner.sizes()

    def split_batches(self, *args):
        return self.inner.split_batches(*args)

    def train_shards(self, *args):
        it = iter(self.inner.train_shards(*args))
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                self.waits.append(time.perf_counter() - t0)
                yield item
        finally:
            it.close()


def train_run(root: Path, out: Path, method: str, batch: int, image_size: int, workers: int, iters: int,
              threads: int) -> dict:
    """A streaming run of the 224 setting (tv:resnet34 -> tv:resnet18, 16 pairs) on the tree."""
    import torch
    import torchvision

    from l2t_dist.config import parse_job
    from l2t_dist.train.data_pipeline import open_data
    from l2t_dist.train.loop import TrainingLoop
    from l2t_dist.train.run_dir import RunDir

    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "resnet34.pth"
    if not ckpt.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet34().state_dict(), ckpt)
    taps = ["layer1", "layer2", "layer3", "layer4"]
    job = parse_job({
        "data": data_cfg(root, batch, image_size, workers).model_dump(),
        "sources": [{"name": "imagenet", "arch": "tv:resnet34", "checkpoint": str(ckpt), "taps": taps}]
        if method != "scratch" else [],
        "target": {"arch": "tv:resnet18", "taps": taps},
        "method": {"name": method, "T": 2, "beta": 0.5},
        "optim": {"lr": 1e-3, "epochs": 1},
        "run": {"name": f"{method}-b{batch}-w{workers}", "out_dir": str(out), "seed": 0, "threads": threads,
                "max_iters_per_epoch": iters},
        "tracking": {"enabled": False},
    })
    data = TimedPipeline(open_data(job.data))
    run_dir = RunDir.open(job, None)
    loop = TrainingLoop(run_dir.job, run_dir.path, data=data, quiet=True)
    t0 = time.perf_counter()
    summary = loop.run()
    wall = time.perf_counter() - t0
    step_s, waits = loop.timing["step_s"], data.waits
    return {"method": method, "batch": batch, "decode_workers": workers, "iters": loop.timing["steps"],
            "step_s_total": step_s, "input_wait_s": waits, "input_wait_share": sum(waits) / (sum(waits) + step_s),
            "input_wait_share_after_first": sum(waits[1:]) / max(1e-9, sum(waits[1:]) + step_s),
            "loop_wait_fraction": summary.wait_fraction, "images_per_s": summary.images_per_s, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=32, help="training images per class (10%% become val)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", default="0,1,2", help="decode worker counts to time")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the worker counts (ABBA order)")
    ap.add_argument("--train-methods", default="scratch", help="methods of the timed training runs ('' for none)")
    ap.add_argument("--train-workers", type=int, default=2)
    ap.add_argument("--train-iters", type=int, default=4)
    ap.add_argument("--train-batch", type=int, default=None, help="default: --batch")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training runs")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="l2t-input-"))
    load = [os.getloadavg()]
    tree = write_tree(work / "cub", args.classes, args.per_class, test_per_class=2)
    counts = [int(w) for w in args.workers.split(",")]
    samples: dict[int, list[dict]] = {w: [] for w in counts}
    for rep in range(args.repeat):
        for w in (counts if rep % 2 == 0 else counts[::-1]):
            r = time_decode(work / "cub", args.batch, args.image_size, w)
            samples[w].append(r)
            print(f"decode_workers={w}: {r['images_per_s']:.1f} img/s ({r['steady_images_per_s']:.1f} after the "
                  f"first batch, first batch {r['first_batch_s']:.2f} s)", flush=True)
    decode = {str(w): {"images_per_s": statistics.median(s["images_per_s"] for s in samples[w]),
                       "steady_images_per_s": statistics.median(s["steady_images_per_s"] for s in samples[w]),
                       "first_batch_s": statistics.median(s["first_batch_s"] for s in samples[w]),
                       "samples": samples[w]} for w in counts}
    load.append(os.getloadavg())
    runs = []
    for method in [m for m in args.train_methods.split(",") if m]:
        r = train_run(work / "cub", work / "runs", method, args.train_batch or args.batch, args.image_size,
                      args.train_workers, args.train_iters, args.threads)
        runs.append(r)
        print(f"train {method}: {r['images_per_s']:.2f} img/s, input wait share {r['input_wait_share']:.4f} "
              f"({r['input_wait_share_after_first']:.4f} after the first batch), loop wait_fraction "
              f"{r['loop_wait_fraction']:.4f}", flush=True)
    load.append(os.getloadavg())
    report = {"benchmark": "input_pipeline", "tree": tree, "batch": args.batch, "image_size": args.image_size,
              "decode": decode, "train_runs": runs,
              "host": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                       "loadavg_start_after_decode_after_train": load},
              "command": "python " + " ".join(sys.argv)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
