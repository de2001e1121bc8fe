"""Images/s and peak memory of one training step per method, in the paper's STL-10 configuration.

TinyImageNet ResNet32 source (taps 4, 9, 14) and VGG9-bn target (taps 0-4) at 32x32: the 15
pairs of L2T-ww all-to-all. Random data and random weights: speed does not depend on them.
Each (method, mode) runs in its own subprocess, so the peak RSS belongs to that method alone.

    python benchmarks/step_throughput.py --batch 128 --T 2 --methods scratch,l2t_ww --json OUT

OUT holds, per method, s_per_iter (median), images_per_s, peak_rss_mb and ratio_to_scratch,
plus the seconds per phase of the L2T step (real step, look-ahead, reverse sweep, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("scratch", "lwf", "at", "fm", "l2t_w", "l2t_ww")


def job_for(method: str, batch: int, T: int, mode: str):
    from l2t_dist.config import parse_job

    return parse_job({
        "data": {"kind": "synthetic", "batch_size": batch},
        "sources": [{"name": "tin", "arch": "l2t_resnet32", "checkpoint": "(random)", "taps": [4, 9, 14],
                     "num_classes": 200}] if method != "scratch" else [],
        "target": {"arch": "vgg9_bn", "taps": [0, 1, 2, 3, 4]},
        "method": {"name": method, "beta": 0.5, "T": T, "hypergrad": mode},
        # The same random batch again and again with the paper's lr 0.1 diverges to NaN by the
        # fourth iteration (random source features are large); the cost of a step does not depend
        # on the learning rate, so a small one keeps the timed iterations finite.
        "optim": {"lr": 1e-3},
    })


def measure(method: str, batch: int, T: int, mode: str, iters: int, warmup: int, threads: int) -> dict:
    """Run in a child process: build the step, time `iters` iterations after `warmup`."""
    import torch

    from l2t_dist.models import build_model
    from l2t_dist.sources.colocated import LoadedSource
    from l2t_dist.train.build import build_trainee

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    job = job_for(method, batch, T, mode)
    sources = []
    if method != "scratch":
        src = build_model("l2t_resnet32", 200).eval().requires_grad_(False)
        sources = [LoadedSource("tin", "l2t_resnet32", src, src.resolve_taps([4, 9, 14]))]
    trainee = build_trainee(job, 10, torch.device("cpu"), sources=sources)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    times, phases = [], {}
    for i in range(warmup + iters):
        trainee.step.timings = {} if i >= warmup else None
        t0 = time.perf_counter()
        trainee.step(x, y, trainee.bank.features(x))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            for k, v in trainee.step.timings.items():
                phases.setdefault(k, []).append(v)
    s = statistics.median(times)
    return {"s_per_iter": s, "images_per_s": batch / s, "times": times,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "phases_s": {k: statistics.median(v) for k, v in phases.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--methods", default="scratch,l2t_ww")
    ap.add_argument("--modes", default="keep", help="hyper-gradient modes for L2T methods: keep,replay")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="OUT", help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, mode = args.child.split(":")
        print(json.dumps(measure(method, args.batch, args.T, mode, args.iters, args.warmup, args.threads)))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown methods {unknown}; allowed: {', '.join(METHODS)}")
    if "scratch" not in methods:
        methods.insert(0, "scratch")  # the ratios need the plain SGD step measured in the same run
    results = {}
    for method in methods:
        modes = args.modes.split(",") if method in ("l2t_w", "l2t_ww") else ["keep"]
        for mode in modes:
            key = method if mode == "keep" else f"{method}[{mode}]"
            cmd = [sys.executable, __file__, "--child", f"{method}:{mode}", "--batch", str(args.batch),
                   "--T", str(args.T), "--iters", str(args.iters), "--warmup", str(args.warmup),
                   "--threads", str(args.threads)]
            load_before = os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{key} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            results[key] = json.loads(proc.stdout.strip().splitlines()[-1])
            # Shared machines are noisy: keep the 1-minute load around each measurement.
            results[key]["load_avg_1m"] = [load_before, os.getloadavg()[0]]
            print(f"{key:>16}: {results[key]['s_per_iter']:.3f} s/iter  {results[key]['images_per_s']:.1f} img/s  "
                  f"peak {results[key]['peak_rss_mb']:.0f} MB", flush=True)
    base = results["scratch"]["s_per_iter"]
    for r in results.values():
        r["ratio_to_scratch"] = r["s_per_iter"] / base
    report = {"config": {"batch": args.batch, "T": args.T, "threads": args.threads, "iters": args.iters,
                         "source": "l2t_resnet32 taps 4,9,14", "target": "vgg9_bn taps 0-4", "pairs": 15,
                         "python": platform.python_version(), "machine": platform.machine(),
                         "torch": _torch_version(), "cpus": os.cpu_count()},
              "methods": results}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    for key, r in results.items():
        print(f"{key:>16}: ratio to scratch {r['ratio_to_scratch']:.2f}")


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
