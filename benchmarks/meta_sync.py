"""cluster.meta_sync per_shard vs global (and global + sync_bn): bytes all-reduced and time per
iteration, 2 workers against 1, measured in one run (JSON output).

The paper's STL-10 configuration on synthetic 32x32 data (TinyImageNet ResNet32 source, taps
4, 9, 14; VGG9-bn target, taps 0-4; 15 all-to-all pairs; T=2; random weights: the cost does
not depend on them). The data-parallel loop runs under plain torch.distributed (gloo, one
process per worker, one thread each, colocated sources), the same TrainingLoop and
DataParallel strategy that Ray Train workers run, without Ray's start-up: what differs
between the modes is the algorithm, not the launcher.

    python benchmarks/meta_sync.py --json benchmarks/results/distributed/meta_sync_2cpu.json

Per configuration: s_per_iter (the last epoch's training time per iteration: start-up and
evaluation excluded), allreduce_bytes_per_iter (one rank's gradient all-reduces), and the
ratios to the one-worker run. On a 2-core machine two workers share the cores with nothing
else; `loadavg` is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

CONFIGS = [("1 worker", 1, "per_shard", False), ("2 workers, per_shard", 2, "per_shard", False),
           ("2 workers, global", 2, "global", False), ("2 workers, global + sync_bn", 2, "global", True)]


def job_tree(out: Path, ckpt: str, name: str, batch: int, iters: int, meta_sync: str, sync_bn: bool) -> dict:
    return {
        "data": {"kind": "synthetic", "path": f"task=c,classes=10,per_class={(batch * iters * 10) // 90 + 2},"
                                              "size=32,seed=0",
                 "image_size": 32, "batch_size": batch, "eval_batch_size": 200},
        "sources": [{"name": "tin", "arch": "l2t_resnet32", "checkpoint": ckpt, "taps": [4, 9, 14]}],
        "target": {"arch": "vgg9_bn", "taps": [0, 1, 2, 3, 4]},
        "method": {"name": "l2t_ww", "T": 2, "beta": 0.5, "pairs": "all_to_all"},
        "optim": {"lr": 0.01, "epochs": 2}, "meta": {"lr": 1e-4},
        "run": {"name": name, "out_dir": str(out), "seed": 0, "threads": 1, "max_iters_per_epoch": iters},
        "cluster": {"meta_sync": meta_sync, "sync_bn": sync_bn},
        "tracking": {"enabled": False},
    }


def _rank(rank: int, world: int, tmp: str, tree: dict, out: str) -> None:
    import sys

    import torch.distributed as dist

    from l2t_dist.config import parse_job
    from l2t_dist.train.loop import TrainingLoop
    from l2t_dist.train.parallel import DataParallel, SingleProcess

    sys.stdout = sys.stderr = open(os.devnull, "w")
    job = parse_job(tree)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg-{tree['run']['name']}", rank=rank,
                                world_size=world)
        parallel = DataParallel(rank, world, meta_sync=job.cluster.meta_sync, sync_bn=job.cluster.sync_bn)
    else:
        parallel = SingleProcess()
    loop = TrainingLoop(job, Path(tmp) / tree["run"]["name"], parallel=parallel, quiet=True)
    summary = loop.run().to_dict()
    if rank == 0:
        Path(out).write_text(json.dumps(summary))
    if world > 1:
        dist.destroy_process_group()


def measure(tmp: Path, ckpt: str, label: str, world: int, meta_sync: str, sync_bn: bool, batch: int,
            iters: int) -> dict:
    import torch.multiprocessing as mp

    name = label.replace(" ", "_").replace(",", "").replace("+", "")
    tree = job_tree(tmp, ckpt, name, batch, iters, meta_sync, sync_bn)
    out = tmp / f"{name}.json"
    t0 = time.perf_counter()
    mp.spawn(_rank, args=(world, str(tmp), tree, str(out)), nprocs=world, join=True)
    s = json.loads(out.read_text())
    return {"label": label, "workers": world, "meta_sync": meta_sync, "sync_bn": sync_bn,
            "images_per_s": s["images_per_s"], "s_per_iter": batch / s["images_per_s"],
            "allreduce_bytes_per_iter": s["allreduce_bytes_per_iter"], "wall_s": time.perf_counter() - t0,
            "loadavg": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3, help="iterations per epoch (2 epochs; the last is timed)")
    args = ap.parse_args()
    import torch

    from l2t_dist.models import build_model
    from l2t_dist.sources.zoo import save_model_checkpoint

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        torch.manual_seed(0)
        ckpt = str(tmp / "tin.pt")
        save_model_checkpoint(ckpt, build_model("l2t_resnet32", 200), "l2t_resnet32")
        before = os.getloadavg()[0]
        rows = [measure(tmp, ckpt, *c, batch=args.batch, iters=args.iters) for c in CONFIGS]
    one = rows[0]
    for r in rows:
        r["time_ratio_to_1_worker"] = r["s_per_iter"] / one["s_per_iter"]
        r["speedup_over_1_worker"] = one["s_per_iter"] / r["s_per_iter"]
    per_shard = next(r for r in rows if r["meta_sync"] == "per_shard" and r["workers"] == 2)
    glob = next(r for r in rows if r["meta_sync"] == "global" and not r["sync_bn"])
    result = {"what": __doc__.splitlines()[0], "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "batch": args.batch, "T": 2,
              "command": f"python benchmarks/meta_sync.py --json {args.json} --batch {args.batch} --iters {args.iters}",
              "loadavg_before": before, "rows": rows,
              "bytes_global_over_per_shard": glob["allreduce_bytes_per_iter"] / per_shard["allreduce_bytes_per_iter"],
              "time_global_over_per_shard": glob["s_per_iter"] / per_shard["s_per_iter"]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    for r in rows:
        print(f"{r['label']:32s} {r['s_per_iter']:7.2f} s/iter  x{r['speedup_over_1_worker']:.2f}  "
              f"{r['allreduce_bytes_per_iter'] / 1e6:8.1f} MB all-reduced/iter")


if __name__ == "__main__":
    main()
