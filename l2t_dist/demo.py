"""`l2t-dist demo`: the whole service on embedded defaults, with no download and no GPU.

1. pretrain two small ResNet20 sources on two synthetic tasks (a, b), 300 images per class,
   and save them as checkpoints;
2. start a local Ray, serve both sources from actors, and train a target on a third task (c)
   with limited data on 2 Ray Train workers, from scratch and with L2T-ww;
3. log both runs to the local MLflow store and register the target as `demo-target`; the
   alias `champion` goes to the better one by val accuracy;
4. print a table of val/test accuracy and images/s, the λ learned per pair, and the command
   that opens the MLflow UI.
The synthetic tasks share visual primitives (see data/synthetic.py), so transfer can help.
`--data-root KIND:PATH` and `--source ARCH:CHECKPOINT` point the same path at real data and
real checkpoints (then nothing is pretrained); `--backend local` runs without Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from l2t_dist.config import DATA_KINDS, JobConfig, parse_job
from l2t_dist.errors import ConfigError

SIZE = 16
# (name, synthetic task, architecture, taps offered for matching: the ends of the 16x16 and 8x8 stages;
#  two per source keep the demo's L2T-ww step cheap: 2 sources x 2 taps x 3 target taps = 12 pairs)
SOURCES = (("src_a", "a", "resnet20", [2, 5]), ("src_b", "b", "resnet20", [2, 5]))
REGISTERED = "demo-target"
# Why these sizes (docs/benchmarks.md, "The demo's gain over 3 seeds"): sources trained on 300 images
# per class reach about 95% / 80% on their tasks, so their features are worth transferring; the
# target trains 100 epochs at lr 0.02 on its 100 images (at 60 epochs both methods still under-fit:
# train accuracy about 80%); val and test hold 30 and 300 images per class, so model selection and
# the test score are not dominated by sampling noise (with 6 and 60 they swung by 4-5 points).


@dataclass(frozen=True)
class Budget:
    """How long the demo trains: the measured full run, or `--quick` (the wiring only)."""
    source_images_per_class: int
    source_epochs: int
    target_epochs: int
    eval_every: int
    target_images_per_class: int  # generated per class and split; training keeps `per_class` of them


FULL, QUICK = Budget(300, 10, 100, 4, 300), Budget(60, 2, 2, 1, 60)


def _synthetic(task: str, per_class: Optional[int] = None, *, on_disk: int) -> dict:
    # `on_disk` images per class are generated; `per_class` keeps only that many for training (limited data).
    return {"kind": "synthetic", "path": f"task={task},classes=10,per_class={on_disk},size={SIZE},seed=0",
            "image_size": SIZE, "batch_size": 32, "eval_batch_size": 500, "per_class": per_class}


def target_data(per_class: int = 10, budget: Budget = FULL) -> dict:
    """The demo target's data section (synthetic task c); benchmarks/parity.py runs the same."""
    return _synthetic("c", per_class, on_disk=budget.target_images_per_class)


def source_job(name: str, task: str, arch: str, out: Path, budget: Budget = FULL) -> JobConfig:
    data = {**_synthetic(task, on_disk=budget.source_images_per_class), "batch_size": 64}
    epochs = budget.source_epochs
    return parse_job({"data": data, "target": {"arch": arch}, "method": {"name": "scratch"},
                      "optim": {"lr": 0.1, "epochs": epochs},
                      "run": {"name": name, "out_dir": str(out), "seed": 0, "eval_every": epochs},
                      "tracking": {"enabled": False}})


def target_job(method: str, sources: list[dict], out: Path, data: dict, *, budget: Budget = FULL,
               workers: int = 2, tracking: Optional[dict] = None, seed: int = 0) -> JobConfig:
    # meta_sync global + sync_bn: the 2 Ray workers run the one-process algorithm on the global
    # batch (docs/distributed.md), so `--backend ray` and `--backend local` answer alike. They are
    # the defaults for this target too; written out so that the demo's job file shows them.
    return parse_job({"data": data, "target": {"arch": "resnet20"},
                      "sources": sources if method != "scratch" else [],
                      "method": {"name": method, "beta": 0.5, "T": 2},
                      "optim": {"lr": 0.02, "epochs": budget.target_epochs}, "meta": {"lr": 1e-3},
                      "run": {"name": f"target-{method}", "out_dir": str(out), "seed": seed,
                              "eval_every": budget.eval_every},
                      "cluster": {"workers": workers, "sources_mode": "served", "meta_sync": "global",
                                  "sync_bn": True},
                      "tracking": tracking or {"enabled": False}})


def parse_source(spec: str, index: int) -> dict:
    """`--source ARCH:CHECKPOINT` -> a job's source entry (default taps: each stage's end)."""
    from l2t_dist.config import ARCH_NAMES
    from l2t_dist.models.names import PREFIXES, check_arch

    prefix, _, rest = spec.partition(":")
    if prefix in PREFIXES:  # tv:resnet18:PATH, timm:convnext_atto:PATH
        name, sep, path = rest.partition(":")
        arch = f"{prefix}:{name}"
    else:
        arch, sep, path = prefix, bool(rest), rest
    if not sep or not path or (arch not in ARCH_NAMES and prefix not in PREFIXES):
        raise ConfigError(f"--source {spec!r} must look like ARCH:CHECKPOINT with ARCH one of "
                          f"{', '.join(ARCH_NAMES)}, tv:NAME or timm:NAME, e.g. "
                          "resnet20:../shared/weights/resnet20-12fca82f.th or tv:resnet18:resnet18-f37072fd.pth")
    check_arch(arch)  # an unknown tv:/timm: name lists the close matches
    if not Path(path).is_file():
        raise ConfigError(f"--source {spec!r}: checkpoint file {path!r} not found")
    return {"name": f"src{index}", "arch": arch, "checkpoint": path}


def parse_data_root(spec: str, per_class: int) -> dict:
    """`--data-root KIND:PATH` -> the target's data section (32x32, the 10% val hold-out)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in DATA_KINDS or kind == "synthetic":
        raise ConfigError(f"--data-root {spec!r} must look like KIND:PATH with KIND one of "
                          f"{', '.join(k for k in DATA_KINDS if k != 'synthetic')}, "
                          "e.g. parquet:../shared/data/cifar10-jpeg")
    if not Path(path).exists():
        raise ConfigError(f"--data-root {spec!r}: {path!r} does not exist")
    return {"kind": kind, "path": path, "image_size": 32, "batch_size": 32, "per_class": per_class}


def run_demo(out_dir: str = "runs/demo", quick: bool = False, quiet: bool = True, backend: str = "ray",
             data_root: Optional[str] = None, source_specs: Sequence[str] = (), tracking_uri: Optional[str] = None,
             per_class: int = 10, seed: int = 0) -> dict:
    from l2t_dist.cli import train_job
    from l2t_dist.train.local import train_local

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"demo output folder {str(out)!r} is not empty; remove it or pass --out NEW_FOLDER")
    sources = [parse_source(s, i) for i, s in enumerate(source_specs)]
    budget = QUICK if quick else FULL
    data = parse_data_root(data_root, per_class) if data_root else target_data(per_class, budget)
    tracking = _tracking(tracking_uri)
    started = time.perf_counter()
    if not sources:
        for name, task, arch, taps in SOURCES:
            print(f"[demo] pretraining source {name} ({arch}) on synthetic task {task} ...", flush=True)
            s = train_local(source_job(name, task, arch, out, budget), quiet=quiet)
            print(f"[demo]   {name}: test accuracy {s.test_acc_at_best_val:.1f}%", flush=True)
            sources.append({"name": name, "arch": arch, "checkpoint": str(out / name / "best.pt"), "taps": taps})
    started_ray = _start_ray() if backend == "ray" else False
    results = {}
    try:
        for method in ("scratch", "l2t_ww"):
            where = "2 Ray Train workers, sources served by Ray actors" if backend == "ray" else "one process"
            print(f"[demo] training the target ({data['kind']}, {data['per_class']} images per class) with "
                  f"{method} on {where} ...", flush=True)
            job = target_job(method, sources, out, data, budget=budget, tracking=tracking, seed=seed)
            results[method] = train_job(job, backend=backend, quiet=quiet).to_dict()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    elapsed = time.perf_counter() - started
    _print_table(results, elapsed, tracking)
    return {"results": results, "seconds": elapsed}


def _tracking(uri: Optional[str]) -> dict:
    """Track in MLflow when it is installed: the store of --tracking-uri, $MLFLOW_TRACKING_URI,
    or the embedded sqlite file in the working directory."""
    from l2t_dist.tracking.uri import mlflow_available

    if not mlflow_available():
        print("[demo] mlflow is not installed: the runs are not tracked", flush=True)
        return {"enabled": False}
    return {"enabled": True, "uri": uri, "experiment": "l2t-dist-demo", "registered_model": REGISTERED,
            "heatmap_every": 5}


def _start_ray() -> bool:
    """One local Ray for both target runs (starting Ray costs seconds)."""
    from l2t_dist.config import ClusterConfig
    from l2t_dist.distributed.launcher import connect

    print("[demo] starting a local Ray ...", flush=True)
    return connect(ClusterConfig(), quiet=True)


def _print_table(results: dict, elapsed: float, tracking: dict) -> None:
    print("\nmethod    val acc   test acc (at best val)   images/s")
    for method, r in results.items():
        print(f"{method:<9} {r['best_val_acc']:>6.1f}%   {r['test_acc_at_best_val']:>6.1f}%"
              f"                 {r['images_per_s'] or 0:>7.0f}")
    pairs = results.get("l2t_ww", {}).get("pairs", {})
    if pairs:
        print("\nlearned λ per pair (where to transfer) and channel-weight entropy (what):")
        for name, v in sorted(pairs.items(), key=lambda kv: -kv[1]["lambda"]):
            print(f"  {name:<28} λ {v['lambda']:.3f}   entropy {v['entropy']:.3f}")
    mlflow = [r.get("mlflow") for r in results.values() if r.get("mlflow")]
    if mlflow:
        reg = [m["registered"] for m in mlflow if m.get("registered")]
        champion = next((r for r in reversed(reg) if r.get("champion")), None)
        uri = mlflow[-1]["tracking_uri"]
        print(f"\nMLflow: both runs in experiment {tracking['experiment']!r} at {uri}")
        for m in reg:
            print(f"  registered {m['name']} version {m['version']}"
                  f"{' -> alias champion' if m.get('champion') else ' (champion unchanged)'}")
        if champion is not None:
            print(f"  load it with: mlflow.pytorch.load_model('models:/{REGISTERED}@champion')")
        if uri.startswith("sqlite:"):
            print(f"  open the UI:  mlflow ui --backend-store-uri {uri}")
        else:
            print(f"  open the UI:  {uri}")
    print(f"\ndemo finished in {elapsed:.0f} s; runs are in their run directories (metrics.jsonl, best.pt)")
