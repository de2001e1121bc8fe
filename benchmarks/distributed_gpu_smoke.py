"""The data-parallel loop on CUDA without Ray: torch.multiprocessing + a process group.

For GPU boxes that have torch but no Ray: runs the training loop with the DataParallel strategy (train/parallel.py)
with `--world` ranks on the visible GPUs (NCCL when every rank has its own GPU, else gloo with
CUDA tensors), a colocated source, and writes JSON with images/s, the replica check and the
max difference from the one-process CPU simulation of the same algorithm.

    python benchmarks/distributed_gpu_smoke.py --world 2 --json OUT

The box needs torch, pydantic and pyyaml; where they are missing and no registry is reachable,
unpack wheels for its Python (pip download ... --python-version 3.12 --only-binary=:all:)
into an ignored folder, carry it, and put it on PYTHONPATH with the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def job_tree(out_dir: str, ckpt: str, device: str, iters: int) -> dict:
    return {"data": {"kind": "synthetic", "path": "task=c,classes=4,per_class=24,size=16,seed=0",
                     "image_size": 16, "batch_size": 30, "eval_batch_size": 64},
            "sources": [{"name": "s", "arch": "resnet20", "checkpoint": ckpt, "taps": [2, 8]}],
            "target": {"arch": "resnet20"}, "method": {"name": "l2t_ww", "T": 1, "beta": 0.1},
            "optim": {"lr": 0.05, "epochs": 1}, "meta": {"lr": 1e-2},
            "run": {"name": "dp", "out_dir": out_dir, "seed": 3, "device": device, "max_iters_per_epoch": iters,
                    "checkpoint_every": 1},
            "cluster": {"meta_sync": "per_shard"}}  # the algorithm simulate_data_parallel computes


def deterministic_cuda() -> None:
    """Comparable runs: no TF32, deterministic cuDNN (the hyper-gradient and Adam's first steps
    amplify rounding differences, so nondeterministic atomics alone move φ by ~lr)."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _rank(rank: int, world: int, tmp: str, ckpt: str, backend: str, iters: int) -> None:
    import torch
    import torch.distributed as dist

    deterministic_cuda()

    from l2t_dist.config import parse_job
    from l2t_dist.train.loop import TrainingLoop
    from l2t_dist.train.parallel import DataParallel

    n_gpu = torch.cuda.device_count()
    torch.cuda.set_device(rank % n_gpu)
    dist.init_process_group(backend, init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    job = parse_job(job_tree(tmp, ckpt, "cuda", iters))
    t0 = time.perf_counter()
    run = TrainingLoop(job, Path(tmp) / "dp", parallel=DataParallel(rank, world, meta_sync=job.cluster.meta_sync))
    summary = run.run().to_dict()
    out = {"summary": {k: v for k, v in summary.items() if k != "pairs"}, "seconds": time.perf_counter() - t0,
           "theta": {n: p.detach().cpu() for n, p in run.trainee.objective.student.named_parameters()},
           "phi": {n: p.detach().cpu() for n, p in run.trainee.objective.meta.named_parameters()}}
    import torch as _t

    _t.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    import torch
    import torch.multiprocessing as mp

    from l2t_dist.config import parse_job
    from l2t_dist.distributed.reference import simulate_data_parallel
    from l2t_dist.models import build_model
    from l2t_dist.sources.zoo import save_model_checkpoint

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible")
    tmp = tempfile.mkdtemp(prefix="l2t-gpu-")
    torch.manual_seed(1)
    ckpt = os.path.join(tmp, "src.pt")
    save_model_checkpoint(ckpt, build_model("resnet20", 5), "resnet20")
    backend = "nccl" if torch.cuda.device_count() >= args.world else "gloo"
    t0 = time.perf_counter()
    mp.spawn(_rank, args=(args.world, tmp, ckpt, backend, args.iters), nprocs=args.world, join=True)
    wall = time.perf_counter() - t0
    ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(args.world)]
    torch.set_num_threads(1)
    deterministic_cuda()
    sim = simulate_data_parallel(parse_job(job_tree(tmp + "/sim", ckpt, "cpu", args.iters)), args.world, args.iters)
    sim_gpu = simulate_data_parallel(parse_job(job_tree(tmp + "/simg", ckpt, "cuda", args.iters)), args.world,
                                     args.iters, device="cuda")

    def maxdiff(a: dict, b: dict) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in b)

    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
              "world": args.world, "backend": backend, "wall_s": wall, "summary_rank0": ranks[0]["summary"],
              "ranks_identical": all(maxdiff(r["theta"], ranks[0]["theta"]) == 0
                                     and maxdiff(r["phi"], ranks[0]["phi"]) == 0 for r in ranks),
              "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
              # the GPU simulation is the meaningful reference; CPU vs GPU float32 differs (TF32, and the
              # hyper-gradient amplifies rounding: see ../shared/ENV.md)
              "max_diff_vs_gpu_simulation": {"theta": maxdiff(ranks[0]["theta"], sim_gpu["theta"]),
                                             "phi": maxdiff(ranks[0]["phi"], sim_gpu["phi"])},
              "max_diff_vs_cpu_simulation": {"theta": maxdiff(ranks[0]["theta"], sim["theta"]),
                                             "phi": maxdiff(ranks[0]["phi"], sim["phi"])}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
