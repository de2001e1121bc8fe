"""Accuracy parity: `--backend local` against `--backend ray` (2 workers) in each meta_sync mode,
over seeds, on the demo's task and on CIFAR-10 with 25 images per class (docs/distributed.md).

Every run is one `l2t-dist train ... --json` in its own process; its summary goes to
RESULTS/<task>-<config>-<method>-s<seed>.json, and runs whose file exists are skipped, so an
interrupted study resumes.

    python benchmarks/parity.py --task demo --seeds 0,1,2                    # run what is missing
    python benchmarks/parity.py --task cifar10 --seeds 0,1,2 --methods l2t_ww
    python benchmarks/parity.py --table                                      # mean and spread

Configs: `local` (one process), `ray-per_shard` (each worker looks ahead on its shard),
`ray-global` (meta_sync global + sync_bn: the one-process algorithm on 2 workers; what the
defaults give a target whose batch norms are torch's) and `ray-global-no_sync_bn` (meta_sync
global, batch norm on each worker's shard: sync_bn false). The demo's
task: the target job of `l2t-dist demo` (synthetic task c, 10 images per class, resnet20
target, the two demo sources pretrained once into runs/parity/sources, the demo's epochs). CIFAR-10:
the real-data study's command at 25 images per class (docs/results.md), 20 epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "parity"
WORK = REPO / "runs" / "parity"
CONFIGS = {"local": ("local", {}),
           "ray-per_shard": ("ray", {"cluster.meta_sync": "per_shard", "cluster.sync_bn": "false"}),
           "ray-global": ("ray", {"cluster.meta_sync": "global", "cluster.sync_bn": "true"}),
           "ray-global-no_sync_bn": ("ray", {"cluster.meta_sync": "global", "cluster.sync_bn": "false"})}
SHARED = Path(os.environ.get("L2T_SHARED", REPO.parent / "shared"))


def demo_sources() -> list[dict]:
    """The demo's two sources, pretrained once (deterministic: seed 0)."""
    from l2t_dist.demo import SOURCES, source_job
    from l2t_dist.train.local import train_local

    out, entries = WORK / "sources", []
    for name, task, arch, taps in SOURCES:
        if not (out / name / "best.pt").exists():
            train_local(source_job(name, task, arch, out), quiet=True)
        entries.append({"name": name, "arch": arch, "checkpoint": str(out / name / "best.pt"), "taps": taps})
    return entries


def job_file(task: str, method: str) -> tuple[Path, dict]:
    """(job file, overrides) of one task and method."""
    if task == "demo":
        import yaml

        from l2t_dist.demo import target_data, target_job

        job = target_job(method, demo_sources(), WORK, target_data())
        path = WORK / f"demo-{method}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
        return path, {}
    return REPO / "jobs" / "cifar10_limited.yaml", {
        "data.path": str(SHARED / "data" / "cifar10-jpeg"),
        "sources.0.checkpoint": str(SHARED / "weights" / "l2tww_tinyimagenet200_resnet32_model_best.pth.tar"),
        "data.batch_size": 32, "data.val_fraction": 0.02, "optim.lr": 0.01, "optim.epochs": 20,
        "run.eval_every": 5, "method.name": method, "data.per_class": 25}


def run_one(task: str, config: str, method: str, seed: int) -> Path:
    out = RESULTS / f"{task}-{config}-{method}-s{seed}.json"
    if out.exists():
        return out
    backend, cluster = CONFIGS[config]
    path, overrides = job_file(task, method)
    name = f"{task}-{config}-{method}-s{seed}"
    overrides = {**overrides, **cluster, "run.seed": seed, "run.name": name, "run.out_dir": str(WORK / "runs"),
                 "tracking.enabled": "false"}
    if backend == "local":
        overrides["run.threads"] = 2
    cmd = ["l2t-dist", "train", str(path), *[f"{k}={v}" for k, v in overrides.items()], "--backend", backend,
           "--quiet", "--json"]
    t0 = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                          cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    record = {"task": task, "config": config, "method": method, "seed": seed, "seconds": time.perf_counter() - t0,
              "command": " ".join(cmd), "test_acc_at_best_val": summary["test_acc_at_best_val"],
              "best_val_acc": summary["best_val_acc"], "final_test_acc": summary["final_test_acc"],
              "images_per_s": summary["images_per_s"], "workers": summary["workers"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"{name}: test {record['test_acc_at_best_val']:.2f}% ({record['seconds']:.0f} s)", flush=True)
    return out


def table() -> None:
    rows: dict = {}
    for f in sorted(RESULTS.glob("*.json")):
        r = json.loads(f.read_text())
        rows.setdefault((r["task"], r["method"], r["config"]), []).append(r)
    print("| task | method | config | seeds | test acc at best val: mean | spread (max - min) | values "
          "| mean - local mean | inside local's seeds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (task, method, config), rs in sorted(rows.items()):
        accs = [r["test_acc_at_best_val"] for r in sorted(rs, key=lambda r: r["seed"])]
        local = [r["test_acc_at_best_val"] for r in rows.get((task, method, "local"), [])]
        # parity: does the mean lie within the range (min..max) of the one-process seeds?
        vs = (f"{statistics.mean(accs) - statistics.mean(local):+.2f} | "
              f"{'yes' if min(local) <= statistics.mean(accs) <= max(local) else 'no'}"
              if local and config != "local" else "| ")
        print(f"| {task} | {method} | {config} | {len(accs)} | {statistics.mean(accs):.2f} | "
              f"{max(accs) - min(accs):.2f} | {', '.join(f'{a:.1f}' for a in accs)} | {vs} |")
    print("\n| task | config | l2t_ww - scratch (means) | spread of l2t_ww / scratch | gain > both spreads |")
    print("|---|---|---|---|---|")
    for task, config in sorted({(t, c) for t, _, c in rows}):
        got = {m: [r["test_acc_at_best_val"] for r in rows.get((task, m, config), [])] for m in ("l2t_ww", "scratch")}
        if all(len(v) >= 2 for v in got.values()):
            gain = statistics.mean(got["l2t_ww"]) - statistics.mean(got["scratch"])
            spreads = [max(v) - min(v) for v in (got["l2t_ww"], got["scratch"])]
            print(f"| {task} | {config} | {gain:+.2f} | {spreads[0]:.2f} / {spreads[1]:.2f} | "
                  f"{'yes' if gain > max(spreads) else 'no'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("demo", "cifar10"), default="demo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--methods", default="scratch,l2t_ww")
    ap.add_argument("--table", action="store_true", help="print the table of the result files and stop")
    args = ap.parse_args()
    if args.table:
        return table()
    for seed in map(int, args.seeds.split(",")):
        for config in args.configs.split(","):
            for method in args.methods.split(","):
                run_one(args.task, config, method, seed)
    table()


if __name__ == "__main__":
    main()
