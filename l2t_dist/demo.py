"""`l2t-dist demo`: the whole method on embedded defaults, with no download and no GPU.

1. pretrain two small sources on two synthetic tasks (a, b) and save them as checkpoints;
2. train a target on a third task (c) with limited data, from scratch and with L2T-ww using
   both sources;
3. print a table of val/test accuracy and the λ that the where-networks learned per pair.
The synthetic tasks share visual primitives (see data/synthetic.py), so transfer can help.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from l2t_dist.config import JobConfig, parse_job

SIZE = 16
# (name, synthetic task, architecture, taps offered for matching: one per resolution 16, 8, 4)
SOURCES = (("src_a", "a", "resnet20", [2, 5, 8]), ("src_b", "b", "vgg9_bn", [0, 1, 2]))


def _data(task: str, per_class: Optional[int] = None) -> dict:
    # 60 images per class on disk; `per_class` keeps only that many for training (limited data).
    return {"kind": "synthetic", "path": f"task={task},classes=10,per_class=60,size={SIZE},seed=0",
            "image_size": SIZE, "batch_size": 32, "eval_batch_size": 500, "per_class": per_class}


def source_job(name: str, task: str, arch: str, out: Path, epochs: int) -> JobConfig:
    return parse_job({"data": _data(task), "target": {"arch": arch}, "method": {"name": "scratch"},
                      "optim": {"lr": 0.05, "epochs": epochs},
                      "run": {"name": name, "out_dir": str(out), "seed": 0}})


def target_job(method: str, sources: list[dict], out: Path, epochs: int, per_class: int) -> JobConfig:
    return parse_job({"data": _data("c", per_class), "target": {"arch": "resnet20"},
                      "sources": sources if method != "scratch" else [],
                      "method": {"name": method, "beta": 0.5, "T": 2},
                      "optim": {"lr": 0.05, "epochs": epochs}, "meta": {"lr": 1e-3},
                      "run": {"name": f"target-{method}", "out_dir": str(out), "seed": 0}})


def run_demo(out_dir: str = "runs/demo", quick: bool = False, quiet: bool = True) -> dict:
    from l2t_dist.train.local import train_local

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        from l2t_dist.errors import ConfigError
        raise ConfigError(f"demo output folder {str(out)!r} is not empty; remove it or pass --out NEW_FOLDER")
    src_epochs, tgt_epochs, per_class = (2, 2, 10) if quick else (8, 30, 10)
    started = time.perf_counter()
    sources = []
    for name, task, arch, taps in SOURCES:
        print(f"[demo] pretraining source {name} ({arch}) on synthetic task {task} ...", flush=True)
        s = train_local(source_job(name, task, arch, out, src_epochs), quiet=quiet)
        print(f"[demo]   {name}: test accuracy {s['test_acc_at_best_val']:.1f}%", flush=True)
        sources.append({"name": name, "arch": arch, "checkpoint": str(out / name / "best.pt"), "taps": taps})
    results = {}
    for method in ("scratch", "l2t_ww"):
        print(f"[demo] training the target on task c ({per_class} images per class) with {method} ...", flush=True)
        results[method] = train_local(target_job(method, sources, out, tgt_epochs, per_class), quiet=quiet)
    elapsed = time.perf_counter() - started
    _print_table(results, elapsed)
    return {"results": results, "seconds": elapsed}


def _print_table(results: dict, elapsed: float) -> None:
    print("\nmethod    val acc   test acc (at best val)   images/s")
    for method, r in results.items():
        print(f"{method:<9} {r['best_val_acc']:>6.1f}%   {r['test_acc_at_best_val']:>6.1f}%"
              f"                 {r['images_per_s'] or 0:>7.0f}")
    pairs = results.get("l2t_ww", {}).get("pairs", {})
    if pairs:
        print("\nlearned λ per pair (where to transfer) and channel-weight entropy (what):")
        for name, v in sorted(pairs.items(), key=lambda kv: -kv[1]["lambda"]):
            print(f"  {name:<28} λ {v['lambda']:.3f}   entropy {v['entropy']:.3f}")
    print(f"\ndemo finished in {elapsed:.0f} s; runs are in their run directories (metrics.jsonl, best.pt)")
