"""Images/s and peak memory of one training step per method, in the paper's STL-10 configuration.

By default: TinyImageNet ResNet32 source (taps 4, 9, 14) and VGG9-bn target (taps 0-4) at
32x32, the 15 pairs of L2T-ww all-to-all; --source-arch/--source-taps/--target-arch/
--target-taps/--image-size/--classes/--pairs give another configuration, e.g. the 224x224 one
(torchvision ResNet34 -> ResNet18, 16 pairs layer1-4 x layer1-4):

    python benchmarks/step_throughput.py --source-arch tv:resnet34 --source-taps layer1,layer2,layer3,layer4 \
      --source-classes 1000 --target-arch tv:resnet18 --target-taps layer1,layer2,layer3,layer4 \
      --image-size 224 --classes 200 --batch 32 --methods scratch,l2t_ww --iters 2 --json OUT

Random data and random weights: speed does not depend on them.

Rows: `torch_plain`, the bare PyTorch step on the target (forward, cross-entropy, backward,
`torch.optim.SGD(lr, momentum, weight_decay).step()`); `scratch`, the project's step of the
same model from the same initial weights on the same batch; and the methods asked for.
Each row lives in its own child process (so its peak RSS is its own, and no row's allocator
state slows another: co-resident, the two plain rows page-fault differently), and the
children step in lockstep, one iteration each per round, in ABBA order, so that the noise of
a shared machine hits every row alike. Ratios are medians of per-round ratios.
torch_plain and scratch must end on the same weights (`same_weights_scratch_torch_plain`,
a hash of the state_dict): they do the same work.

    python benchmarks/step_throughput.py --batch 128 --T 2 --methods scratch,l2t_ww --json OUT

OUT holds, per row, s_per_iter (median), images_per_s, times, peak_rss_mb, ratio_to_scratch
(median of the paired ratios) and the seconds per phase of the L2T step (real step,
look-ahead, reverse sweep, ...), and scratch_over_torch_plain.
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
import tempfile
import time


def taps_of(text: str) -> list:
    """'4,9,14' -> [4, 9, 14]; 'layer1,layer2' -> names."""
    return [int(t) if t.strip().isdigit() else t.strip() for t in text.split(",") if t.strip()]


def job_for(method: str, args, mode: str):
    from l2t_dist.config import parse_job
    from l2t_dist.method.methods import get_method

    return parse_job({
        "data": {"kind": "synthetic", "batch_size": args.batch, "image_size": args.image_size},
        "sources": [{"name": "src", "arch": args.source_arch, "checkpoint": "(random)",
                     "taps": taps_of(args.source_taps), "num_classes": args.source_classes}]
        if get_method(method).needs_sources else [],
        "target": {"arch": args.target_arch, "taps": taps_of(args.target_taps)},
        "method": {"name": method, "beta": 0.5, "T": args.T, "hypergrad": mode,
                   **({"pairs": args.pairs} if args.pairs and get_method(method).uses_pairs else {})},
        # The same random batch again and again with the paper's lr 0.1 diverges to NaN by the
        # fourth iteration (random source features are large); the cost of a step does not depend
        # on the learning rate, so a small one keeps the timed iterations finite.
        "optim": {"lr": 1e-3},
    })


def build_row(row: str, args):
    """(step function, the module whose weights it trains, its L2TStep or None, its pairs) for one row."""
    import torch
    import torch.nn.functional as F

    from l2t_dist.method.methods import get_method
    from l2t_dist.models import build_model
    from l2t_dist.sources.colocated import LoadedSource
    from l2t_dist.sources.feeder import source_features
    from l2t_dist.train.build import build_trainee

    torch.set_num_threads(args.threads)
    method, _, mode = row.partition(":")
    job = job_for("scratch" if method == "torch_plain" else method, args, mode or "keep")
    g = torch.Generator().manual_seed(1)
    batch, side = args.batch, args.image_size
    x, y = torch.randn(batch, 3, side, side, generator=g), torch.randint(0, args.classes, (batch,), generator=g)
    torch.manual_seed(0)   # the same initial target weights in every row
    if method == "torch_plain":
        model = build_model(job.target.arch, args.classes)
        o = job.optim
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)

        def torch_plain():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return torch_plain, model, None, 0
    sources = []
    if get_method(method).needs_sources:
        [cfg] = job.sources
        src = build_model(cfg.arch, cfg.num_classes).eval().requires_grad_(False)
        sources = [LoadedSource(cfg.name, cfg.arch, src, src.resolve_taps(cfg.taps))]
    trainee = build_trainee(job, args.classes, torch.device("cpu"), sources=sources)

    def step():
        with torch.no_grad():
            feats = source_features(trainee.sources, trainee.requests, x)
        trainee.step(x, y, feats)

    return step, trainee.target, trainee.step, len(trainee.pairs)


def serve(row: str, args) -> None:
    """Child: build the row, then time one iteration per "step" line read from stdin."""
    import hashlib

    fn, module, l2t, pairs = build_row(row, args)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        if l2t is not None:
            l2t.timings = {}
        t0 = time.perf_counter()
        fn()
        print(json.dumps({"s": time.perf_counter() - t0, "phases": l2t.timings if l2t is not None else {}}),
              flush=True)
    digest = hashlib.sha256()
    for t in module.state_dict().values():
        digest.update(t.detach().contiguous().numpy().tobytes())
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "weights_sha256": digest.hexdigest(), "pairs": pairs}), flush=True)


class Child:
    """One row's process, driven line by line."""

    def __init__(self, row: str, args):
        self.row, self.err = row, tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, __file__, "--child", row, *(f"--{k.replace('_', '-')}={getattr(args, k)}"
                                                          for k in MODEL_OPTIONS)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            self.proc.wait()
            self.err.seek(0)
            sys.exit(f"{self.row} failed (exit {self.proc.returncode}):\n{self.err.read()[-3000:]}")
        return json.loads(reply)


# the options a child process needs to build its row
MODEL_OPTIONS = ("batch", "T", "threads", "source_arch", "source_taps", "source_classes", "target_arch", "target_taps",
                 "image_size", "classes", "pairs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--source-arch", default="l2t_resnet32")
    ap.add_argument("--source-taps", default="4,9,14", help="comma-separated tap indices or names")
    ap.add_argument("--source-classes", type=int, default=200)
    ap.add_argument("--target-arch", default="vgg9_bn")
    ap.add_argument("--target-taps", default="0,1,2,3,4")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10, help="classes of the target task")
    ap.add_argument("--pairs", default="", help="pair preset (single, one_to_one, all_to_all); default: the method's")
    ap.add_argument("--methods", default="scratch,l2t_ww")
    ap.add_argument("--modes", default="keep", help="hyper-gradient modes for L2T methods: keep,replay")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="OUT", help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        serve(args.child, args)
        return
    from l2t_dist.method.methods import get_method, method_names

    methods = [m for m in args.methods.split(",") if m and m != "scratch"]
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        sys.exit(f"unknown methods {unknown}; allowed: {', '.join(method_names())}")
    # torch_plain and scratch always: the ratios need them measured in the same run.
    modes = args.modes.split(",")
    rows = ["torch_plain", "scratch"] + [f"{m}:{mode}" for m in methods
                                         for mode in (modes if get_method(m).meta_networks else ["keep"])]
    load_before = os.getloadavg()[0]
    children = [Child(row, args) for row in rows]
    times: dict[str, list[float]] = {row: [] for row in rows}
    phases: dict[str, dict[str, list[float]]] = {row: {} for row in rows}
    for i in range(args.warmup + args.iters):
        for child in (children if i % 2 == 0 else children[::-1]):
            reply = child.ask("step")
            if i >= args.warmup:
                times[child.row].append(reply["s"])
                for k, v in reply["phases"].items():
                    phases[child.row].setdefault(k, []).append(v)
    final = {child.row: child.ask("done") for child in children}
    load = [load_before, os.getloadavg()[0]]   # shared machines are noisy: the 1-minute load around the run

    def paired(row: str, base: str) -> float:
        return statistics.median(a / b for a, b in zip(times[row], times[base]))

    results = {}
    for row in rows:
        method, _, mode = row.partition(":")
        key = method if mode in ("", "keep") else f"{method}[{mode}]"
        s = statistics.median(times[row])
        results[key] = {"s_per_iter": s, "images_per_s": args.batch / s, "times": times[row],
                        "peak_rss_mb": final[row]["peak_rss_mb"], "ratio_to_scratch": paired(row, "scratch"),
                        "phases_s": {k: statistics.median(v) for k, v in phases[row].items()}, "load_avg_1m": load}
        print(f"{key:>16}: {s:.3f} s/iter  {args.batch / s:.1f} img/s  peak {final[row]['peak_rss_mb']:.0f} MB  "
              f"ratio to scratch {results[key]['ratio_to_scratch']:.3f}", flush=True)
    same = final["scratch"]["weights_sha256"] == final["torch_plain"]["weights_sha256"]
    ratio = paired("scratch", "torch_plain")
    print(f"scratch / torch_plain: {ratio:.3f} (median of {args.iters} paired ratios); same weights: {same}; "
          f"1-minute load {load[0]:.2f} -> {load[1]:.2f}")
    report = {"config": {"batch": args.batch, "T": args.T, "threads": args.threads, "iters": args.iters,
                         "warmup": args.warmup, "source": f"{args.source_arch} taps {args.source_taps}",
                         "target": f"{args.target_arch} taps {args.target_taps}", "image_size": args.image_size,
                         "classes": args.classes, "pairs": max(f["pairs"] for f in final.values()),
                         "python": platform.python_version(), "machine": platform.machine(),
                         "torch": _torch_version(), "cpus": os.cpu_count(), "command": "python " + " ".join(sys.argv)},
              "scratch_over_torch_plain": ratio, "same_weights_scratch_torch_plain": same, "methods": results}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
