"""Images/s and peak memory of one training step per method, in the paper's STL-10 configuration.

TinyImageNet ResNet32 source (taps 4, 9, 14) and VGG9-bn target (taps 0-4) at 32x32: the 15
pairs of L2T-ww all-to-all. Random data and random weights: speed does not depend on them.
Each (method, mode) runs in its own subprocess, so the peak RSS belongs to that method alone,
except `torch_plain` and `scratch`, which share one: `torch_plain` is the bare PyTorch step
(forward, cross-entropy, backward, `torch.optim.SGD(lr, momentum, weight_decay).step()`) on
the same model, initial weights and batch, and the two alternate iteration by iteration
(ABBA), so that the noise of a shared machine hits both alike. Both end on the same weights
(`same_weights`): they do the same work.

    python benchmarks/step_throughput.py --batch 128 --T 2 --methods scratch,l2t_ww --json OUT

OUT holds, per row, s_per_iter (median), images_per_s, peak_rss_mb and ratio_to_scratch,
plus the seconds per phase of the L2T step (real step, look-ahead, reverse sweep, ...), and
scratch_over_torch_plain: the median over iterations of the paired ratio.
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


def job_for(method: str, batch: int, T: int, mode: str):
    from l2t_dist.config import parse_job
    from l2t_dist.method.methods import get_method

    return parse_job({
        "data": {"kind": "synthetic", "batch_size": batch},
        "sources": [{"name": "tin", "arch": "l2t_resnet32", "checkpoint": "(random)", "taps": [4, 9, 14],
                     "num_classes": 200}] if get_method(method).needs_sources else [],
        "target": {"arch": "vgg9_bn", "taps": [0, 1, 2, 3, 4]},
        "method": {"name": method, "beta": 0.5, "T": T, "hypergrad": mode},
        # The same random batch again and again with the paper's lr 0.1 diverges to NaN by the
        # fourth iteration (random source features are large); the cost of a step does not depend
        # on the learning rate, so a small one keeps the timed iterations finite.
        "optim": {"lr": 1e-3},
    })


def _trainee(method: str, batch: int, T: int, mode: str, threads: int):
    import torch

    from l2t_dist.method.methods import get_method
    from l2t_dist.models import build_model
    from l2t_dist.sources.colocated import LoadedSource
    from l2t_dist.train.build import build_trainee

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    job = job_for(method, batch, T, mode)
    sources = []
    if get_method(method).needs_sources:
        src = build_model("l2t_resnet32", 200).eval().requires_grad_(False)
        sources = [LoadedSource("tin", "l2t_resnet32", src, src.resolve_taps([4, 9, 14]))]
    return job, build_trainee(job, 10, torch.device("cpu"), sources=sources)


def _batch(batch: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)


def _features(trainee, x):
    import torch

    from l2t_dist.sources.feeder import source_features

    with torch.no_grad():
        return source_features(trainee.sources, trainee.requests, x)


def _row(times: list[float], batch: int, phases: dict) -> dict:
    s = statistics.median(times)
    return {"s_per_iter": s, "images_per_s": batch / s, "times": times,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "phases_s": {k: statistics.median(v) for k, v in phases.items()}}


def measure(method: str, batch: int, T: int, mode: str, iters: int, warmup: int, threads: int) -> dict:
    """Run in a child process: build the step, time `iters` iterations after `warmup`."""
    _, trainee = _trainee(method, batch, T, mode, threads)
    x, y = _batch(batch)
    times, phases = [], {}
    for i in range(warmup + iters):
        trainee.step.timings = {} if i >= warmup else None
        t0 = time.perf_counter()
        trainee.step(x, y, _features(trainee, x))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            for k, v in trainee.step.timings.items():
                phases.setdefault(k, []).append(v)
    return _row(times, batch, phases)


def measure_plain(batch: int, iters: int, warmup: int, threads: int) -> dict:
    """Run in a child process: torch_plain and scratch on twin models, alternating ABBA."""
    import torch
    import torch.nn.functional as F

    from l2t_dist.models import build_model

    job, trainee = _trainee("scratch", batch, 2, "keep", threads)
    torch.manual_seed(0)
    model = build_model(job.target.arch, 10)   # the same initial weights as the trainee's target
    o = job.optim
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    x, y = _batch(batch)

    def torch_plain():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def scratch():
        trainee.step(x, y, {})

    runs = {"torch_plain": (torch_plain, []), "scratch": (scratch, [])}
    for i in range(warmup + iters):
        for name in (("torch_plain", "scratch") if i % 2 == 0 else ("scratch", "torch_plain")):
            fn, times = runs[name]
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    out = {name: _row(times, batch, {}) for name, (_, times) in runs.items()}
    ratios = [a / b for a, b in zip(runs["scratch"][1], runs["torch_plain"][1])]
    same = all(torch.equal(a, b) for a, b in zip(trainee.target.state_dict().values(), model.state_dict().values()))
    return {"rows": out, "scratch_over_torch_plain": statistics.median(ratios), "paired_ratios": ratios,
            "same_weights": same}


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
    if args.child == "plain":
        print(json.dumps(measure_plain(args.batch, args.iters, args.warmup, args.threads)))
        return
    if args.child:
        method, mode = args.child.split(":")
        print(json.dumps(measure(method, args.batch, args.T, mode, args.iters, args.warmup, args.threads)))
        return
    from l2t_dist.method.methods import get_method, method_names

    methods = [m for m in args.methods.split(",") if m and m != "scratch"]
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        sys.exit(f"unknown methods {unknown}; allowed: {', '.join(method_names())}")
    # torch_plain and scratch always, in one child: the ratios need them measured in the same run.
    runs = [("plain", None)] + [(f"{m}:{mode}", m if mode == "keep" else f"{m}[{mode}]") for m in methods
                                for mode in (args.modes.split(",") if get_method(m).meta_networks else ["keep"])]
    results, extra = {}, {}
    for child, key in runs:
        cmd = [sys.executable, __file__, "--child", child, "--batch", str(args.batch), "--T", str(args.T),
               "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        load_before = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{key or child} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        if child == "plain":
            rows, extra = out.pop("rows"), out
        else:
            rows = {key: out}
        for name, row in rows.items():
            # Shared machines are noisy: keep the 1-minute load around each measurement.
            row["load_avg_1m"] = [load_before, os.getloadavg()[0]]
            results[name] = row
            print(f"{name:>16}: {row['s_per_iter']:.3f} s/iter  {row['images_per_s']:.1f} img/s  "
                  f"peak {row['peak_rss_mb']:.0f} MB", flush=True)
    base = results["scratch"]["s_per_iter"]
    for r in results.values():
        r["ratio_to_scratch"] = r["s_per_iter"] / base
    report = {"config": {"batch": args.batch, "T": args.T, "threads": args.threads, "iters": args.iters,
                         "source": "l2t_resnet32 taps 4,9,14", "target": "vgg9_bn taps 0-4", "pairs": 15,
                         "python": platform.python_version(), "machine": platform.machine(),
                         "torch": _torch_version(), "cpus": os.cpu_count()},
              "scratch_over_torch_plain": extra["scratch_over_torch_plain"],
              "paired_ratios_scratch_over_torch_plain": extra["paired_ratios"],
              "same_weights_scratch_torch_plain": extra["same_weights"], "methods": results}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    for key, r in results.items():
        print(f"{key:>16}: ratio to scratch {r['ratio_to_scratch']:.3f}")
    print(f"scratch / torch_plain (median of paired ratios): {extra['scratch_over_torch_plain']:.3f}; "
          f"same weights after the run: {extra['same_weights']}")


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
