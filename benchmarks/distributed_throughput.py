"""`--backend ray` throughput on one machine, as ratios measured in one run (JSON output).

Runs the same two-source L2T-ww job (resnet20 and vgg9_bn sources, resnet20 target,
synthetic 32x32 data) under one local Ray with a fixed CPU budget:
- served vs colocated sources on the same resources (2 workers each);
- the fraction of each step a worker spends waiting for served features;
- 2 workers vs 1 (images/s per worker, served);
- feature bytes per image per source, fp32 vs bf16 transport.

    python benchmarks/distributed_throughput.py --json runs/bench/distributed.json [--quick]

images_per_s is the training loop's rate in the last epoch (start-up and evaluation are
excluded); every run is 2 epochs so that the first absorbs the warm-up. On a shared 2-core
machine the numbers move with the load of other processes: `loadavg` is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def make_sources(folder: Path) -> list[dict]:
    import torch

    from l2t_dist.models import build_model
    from l2t_dist.sources.zoo import save_model_checkpoint

    torch.manual_seed(0)
    out = []
    for name, arch, classes, taps in (("res", "resnet20", 10, [2, 5, 8]), ("vgg", "vgg9_bn", 10, [1, 2, 3])):
        path = folder / f"{name}.pt"
        save_model_checkpoint(str(path), build_model(arch, classes), arch)
        out.append({"name": name, "arch": arch, "checkpoint": str(path), "taps": taps})
    return out


def job_for(out: Path, sources: list[dict], name: str, iters: int, batch: int, cpus: int, **cluster):
    from l2t_dist.config import parse_job

    return parse_job({
        "data": {"kind": "synthetic", "path": "task=c,classes=10,per_class=40,size=32,seed=0",
                 "image_size": 32, "batch_size": batch, "eval_batch_size": 200},
        "sources": sources, "target": {"arch": "resnet20"},
        "method": {"name": "l2t_ww", "T": 1, "beta": 0.1}, "optim": {"lr": 0.05, "epochs": 2}, "meta": {"lr": 1e-3},
        "run": {"name": name, "out_dir": str(out), "seed": 0, "max_iters_per_epoch": iters},
        # per_shard, per-worker BN: the algorithm of the recorded results (the defaults before
        # 2026-12-07); what global and sync_bn cost is benchmarks/meta_sync.py's question
        "cluster": {"num_cpus": cpus, "max_failures": 0, "meta_sync": "per_shard", "sync_bn": False, **cluster},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output file")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    ap.add_argument("--iters", type=int, default=4, help="iterations per epoch")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration, interleaved; the median is kept")
    ap.add_argument("--quick", action="store_true", help="2 iterations per epoch, batch 16")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.batch = 2, 16

    import ray

    from l2t_dist.distributed.launcher import train_ray

    work = Path(tempfile.mkdtemp(prefix="l2t-bench-"))
    sources = make_sources(work)
    ray.init(num_cpus=args.cpus, log_to_driver=False)
    runs = {
        "served_2w_fp32": {"workers": 2, "sources_mode": "served", "feature_dtype": "fp32"},
        "colocated_2w": {"workers": 2, "sources_mode": "colocated"},
        "served_1w_fp32": {"workers": 1, "sources_mode": "served", "feature_dtype": "fp32"},
        "served_2w_bf16": {"workers": 2, "sources_mode": "served", "feature_dtype": "bf16"},
    }
    samples: dict[str, list[dict]] = {name: [] for name in runs}
    load_before = os.getloadavg()
    try:
        for rep in range(args.repeat):  # interleaved, so that a change of machine load hits every config
            for name, cluster in runs.items():
                t0 = time.perf_counter()
                s = train_ray(job_for(work, sources, f"{name}-{rep}", args.iters, args.batch, args.cpus, **cluster),
                              quiet=True).to_dict()
                samples[name].append({"images_per_s": s["images_per_s"], "wait_fraction": s.get("wait_fraction"),
                                      "feature_bytes_per_image": s.get("feature_bytes_per_image"),
                                      "wall_s": time.perf_counter() - t0})
                print(f"{name} #{rep}: {s['images_per_s']:.2f} img/s, wait {s.get('wait_fraction', 0):.3f}, "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
    finally:
        ray.shutdown()
    results = {}
    for name, cluster in runs.items():
        runs_ = sorted(samples[name], key=lambda x: x["images_per_s"])
        mid = runs_[len(runs_) // 2]
        results[name] = {"cluster": cluster, "images_per_s": mid["images_per_s"],
                         "images_per_s_per_worker": mid["images_per_s"] / cluster["workers"],
                         "wait_fraction": mid["wait_fraction"],
                         "feature_bytes_per_image": mid["feature_bytes_per_image"],
                         "samples_images_per_s": [x["images_per_s"] for x in samples[name]],
                         "wall_s": [x["wall_s"] for x in samples[name]]}
    r = results
    fp32, bf16 = r["served_2w_fp32"]["feature_bytes_per_image"], r["served_2w_bf16"]["feature_bytes_per_image"]
    report = {
        "benchmark": "distributed_throughput",
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "ray_cpus": args.cpus,
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "notes": "wait_fraction: share of a worker's step spent getting features (served: blocked on the "
                 "actors; colocated: computing the sources in the worker). images_per_s: the median run's.",
        "job": {"sources": [f"{s['arch']} taps {s['taps']}" for s in sources], "target": "resnet20",
                "image_size": 32, "batch": args.batch, "iters_per_epoch": args.iters, "T": 1},
        "runs": results,
        "ratios": {
            "served_over_colocated": r["served_2w_fp32"]["images_per_s"] / r["colocated_2w"]["images_per_s"],
            "wait_fraction_served_2w": r["served_2w_fp32"]["wait_fraction"],
            "per_worker_2w_over_1w": r["served_2w_fp32"]["images_per_s_per_worker"]
            / r["served_1w_fp32"]["images_per_s_per_worker"],
            "speedup_2w_over_1w": r["served_2w_fp32"]["images_per_s"] / r["served_1w_fp32"]["images_per_s"],
            "bf16_over_fp32_bytes": {k: bf16[k] / fp32[k] for k in fp32},
        },
        "feature_bytes_per_image": {"fp32": fp32, "bf16": bf16},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
