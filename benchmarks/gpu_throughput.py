"""Images/s and peak GPU memory of the plain step and the L2T-ww step: fp32/bf16, eager/compiled.

The paper's STL-10 configuration at 32x32, built exactly as `step_throughput.py` builds it
(`job_for`): TinyImageNet ResNet32 source (taps 4, 9, 14) and VGG9-bn target (taps 0-4), the
15 pairs of L2T-ww all-to-all, T=2, random data and random weights (speed does not depend on
them). One process, variants run one after the other; each variant builds a fresh model and is
wrapped in try/except, so one failure is recorded and the others still run. The JSON is
rewritten after every variant, so a run stopped by a time limit keeps what it measured.

Variants (`--variants`, comma separated; default: all, in this order):
  scratch:fp32:eager, l2t_ww:fp32:eager, scratch:bf16:eager, l2t_ww:bf16:eager, fm:fp32:eager
      the trainer's own step (`L2TStep.step`, metrics read back each iteration, which syncs)
      plus the source forward; bf16 = torch.autocast(device, bfloat16) around both
  l2t_ww:bf16:eager_jvp32       bf16 autocast, but the hyper-gradient's forward-mode JVP (first
                                 look-ahead step) runs with autocast disabled, in fp32
  scratch:{fp32,bf16}:nosync     the plain step as a bare function (forward, autograd.grad,
                                 SGD update) with no metric read-back: the eager twin of ...
  scratch:{fp32,bf16}:cudagraph  ... that function captured once in a CUDA graph and replayed
  scratch:{fp32,bf16}:compile    torch.compile (default mode) of the target's forward_taps
  l2t_ww:{fp32,bf16}:compile_real  compiled forward in the real step only; the look-ahead and
                                   hyper-gradient call the eager forward
  l2t_ww:fp32:compile_all        compiled forward everywhere, the hyper-gradient included
  scratch:fp32:compile_ro        torch.compile(mode="reduce-overhead") (inductor's CUDA graphs)

Timing: torch.cuda.synchronize() before and after each iteration, median over --iters
iterations after --warmup; peak memory: torch.cuda.max_memory_allocated() over the variant.

    python benchmarks/gpu_throughput.py --json OUT.json              # on a GPU
    python benchmarks/gpu_throughput.py --device cpu --iters 2 --warmup 1 --batch 8 \\
        --variants scratch:fp32:eager,l2t_ww:bf16:eager --json /tmp/t.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ALL = ("scratch:fp32:eager,l2t_ww:fp32:eager,scratch:bf16:eager,l2t_ww:bf16:eager,l2t_ww:bf16:eager_jvp32,"
       "fm:fp32:eager,"
       "scratch:fp32:nosync,scratch:fp32:cudagraph,scratch:bf16:nosync,scratch:bf16:cudagraph,"
       "scratch:fp32:compile,scratch:bf16:compile,l2t_ww:fp32:compile_real,l2t_ww:bf16:compile_real,"
       "l2t_ww:fp32:compile_all,scratch:fp32:compile_ro")


def build(method: str, batch: int, T: int, device):
    import torch
    from step_throughput import job_for

    from l2t_dist.models import build_model
    from l2t_dist.sources.colocated import LoadedSource
    from l2t_dist.train.build import build_trainee

    torch.manual_seed(0)
    job = job_for(method, batch, T, "keep")
    sources = []
    if method != "scratch":
        src = build_model("l2t_resnet32", 200).eval().requires_grad_(False).to(device)
        sources = [LoadedSource("tin", "l2t_resnet32", src, src.resolve_taps([4, 9, 14]))]
    return build_trainee(job, 10, device, sources=sources)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, precision: str, cache: bool = True):
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


def patch_compile(trainee, which: str, mode: str = "default") -> None:
    """Replace the target's forward_taps by a compiled one: everywhere, or in the real step only."""
    import torch

    target = trainee.target
    orig = target.forward_taps
    compiled = torch.compile(orig, mode=mode)
    if which == "all":
        target.forward_taps = compiled
        return
    state = {"meta": False}

    def forward_taps(*args, **kwargs):
        return (orig if state["meta"] else compiled)(*args, **kwargs)

    target.forward_taps = forward_taps
    step = trainee.step
    orig_meta = step._meta_step

    def meta_step(batch):
        state["meta"] = True
        try:
            return orig_meta(batch)
        finally:
            state["meta"] = False

    step._meta_step = meta_step


def plain_fn(trainee, x, y, precision: str, device, cache: bool = True):
    """The plain (scratch) step as a bare function: forward, autograd.grad, SGD update; no sync."""
    from l2t_dist.bilevel import grads_of, sgd_step_

    obj, step = trainee.objective, trainee.step

    def run():
        with autocast(device, precision, cache):
            loss, _, _ = obj.real_loss(obj.prepare(x, y, {}))
        grads = grads_of(loss, step.theta)
        sgd_step_(step.theta, step.bufs, grads, step.hp)
        return loss

    return run


def measure(variant: str, args, device) -> dict:
    import torch

    from l2t_dist.sources.feeder import source_features

    method, precision, mode = variant.split(":")
    trainee = build(method, args.batch, args.T, device)
    # The same random batch every iteration: at the paper's lr 0.1 the random-weight model
    # diverges within a few steps and the trainer's NaN check stops it; speed does not depend on lr.
    trainee.step.set_lr(args.lr)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    extra: dict = {}
    if mode in ("compile", "compile_real", "compile_all", "compile_ro"):
        if mode == "compile_ro":
            patch_compile(trainee, "all", mode="reduce-overhead")
        else:
            patch_compile(trainee, "real" if mode == "compile_real" else "all")

    if mode == "eager_jvp32":
        # bf16 everywhere except the forward-mode JVP of the hyper-gradient's first step, which
        # runs with autocast disabled (torch.func.jvp under autocast fails: see the JSON).
        orig_jvp = torch.func.jvp

        def jvp_fp32(*a, **k):
            with torch.autocast(device.type, enabled=False):
                return orig_jvp(*a, **k)

        torch.func.jvp = jvp_fp32
        extra["restore"] = lambda: setattr(torch.func, "jvp", orig_jvp)
    if mode in ("nosync", "cudagraph"):
        if method != "scratch":
            raise ValueError("nosync/cudagraph variants are for the plain step only")
        fn = plain_fn(trainee, x, y, precision, device, cache=(mode != "cudagraph"))
        if mode == "cudagraph":
            if device.type != "cuda":
                raise RuntimeError("CUDA graphs need a CUDA device")
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_loss = fn()
            one = graph.replay
        else:
            static_loss = None
            one = fn
    else:
        def one():
            with autocast(device, precision):
                return trainee.step(x, y, source_features(trainee.sources, trainee.requests, x))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_first = time.perf_counter()
    out = None
    for _ in range(max(1, args.warmup)):
        out = one()
    sync(device)
    extra["warmup_s"] = time.perf_counter() - t_first
    times = []
    for _ in range(args.iters):
        sync(device)
        t0 = time.perf_counter()
        out = one()
        sync(device)
        times.append(time.perf_counter() - t0)
    if mode == "cudagraph":
        out = {"loss": float(static_loss)}
    elif mode == "nosync":
        out = {"loss": float(out.detach())}
    restore = extra.pop("restore", None)
    if restore is not None:
        restore()
    s = statistics.median(times)
    res = {"ok": True, "method": method, "precision": precision, "mode": mode, "s_per_iter": s,
           "images_per_s": args.batch / s, "min_s": min(times), "max_s": max(times), "iters": len(times),
           "last_metrics": {k: float(v) for k, v in (out or {}).items()}, **extra}
    if device.type == "cuda":
        res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if method in ("l2t_ww", "l2t_w") and mode == "eager" and precision == "fp32" and args.phases:
        trainee.step.timings = {}
        n = 5
        for _ in range(n):
            one()
        res["phases_s"] = {k: v / n for k, v in trainee.step.timings.items()}
        trainee.step.timings = None
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lr", type=float, default=1e-3,
                    help="SGD lr of the benchmarked steps (speed does not depend on it)")
    ap.add_argument("--variants", default=ALL)
    ap.add_argument("--no-phases", dest="phases", action="store_false", help="skip the per-phase timing pass")
    ap.add_argument("--json", metavar="OUT", required=True)
    args = ap.parse_args()

    import torch

    device = torch.device(args.device)
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "batch": args.batch, "T": args.T, "lr": args.lr, "iters": args.iters, "warmup": args.warmup,
            "source": "l2t_resnet32 taps 4,9,14 (random weights)", "target": "vgg9_bn taps 0-4", "pairs": 15,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_gb=p.total_memory / 2**30, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    report = {"config": info, "variants": {}}
    orig_jvp = torch.func.jvp

    def write():
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)

    for variant in [v for v in args.variants.split(",") if v]:
        t0 = time.perf_counter()
        try:
            res = measure(variant, args, device)
            print(f"{variant:>28}: {res['s_per_iter'] * 1e3:8.2f} ms/iter {res['images_per_s']:9.1f} img/s "
                  f"peak {res.get('peak_mem_mb', float('nan')):8.0f} MB", flush=True)
        except Exception as err:  # record honestly, keep going
            tb = traceback.format_exc()
            res = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000], "traceback": tb[-4000:]}
            print(f"{variant:>28}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        res["wall_s"] = time.perf_counter() - t0
        torch.func.jvp = orig_jvp  # a failed eager_jvp32 variant must not leave its patch behind
        report["variants"][variant] = res
        if device.type == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        write()
    write()


if __name__ == "__main__":
    main()
