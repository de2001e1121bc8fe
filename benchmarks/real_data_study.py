"""The real-data study of docs/results.md: CIFAR-10 limited data, five methods, several seeds,
and the two-source run, each as one `l2t-dist train` command.

Every finished run leaves one small JSON in --results (the exact command, its seed, the best
val epoch, the test accuracy there, the λ of every pair after every epoch), so the study can
be stopped and continued: a run whose JSON exists is skipped. `--table` prints the Markdown
tables of docs/results.md from those files (mean and spread over seeds).

    python benchmarks/real_data_study.py --list                 # the plan, in order
    python benchmarks/real_data_study.py --only 25              # runs whose name contains "25"
    python benchmarks/real_data_study.py --table                # the tables, from the JSON files
    python benchmarks/real_data_study.py --lambdas c10-25-l2t_ww-s0   # λ per pair over training
    python benchmarks/real_data_study.py --heatmap c10-25-l2t_ww-s0 docs/img/lambda_c10_25.png

The budget is the short CPU one (20 epochs, batch 32, lr 0.01, 2% val, test every 5 epochs);
see docs/results.md for why it differs from the paper's 200 epochs at batch 128.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET = ["data.batch_size=32", "data.val_fraction=0.02", "optim.lr=0.01", "optim.epochs=20",
          "run.eval_every=5", "run.threads=2", "tracking.enabled=false"]
# method -> overrides; fm and at on one-to-one pairs (the paper's baselines), l2t_ww all-to-all
METHODS = {"scratch": ["method.name=scratch"], "fm": ["method.name=fm", "method.pairs=one_to_one"],
           "at": ["method.name=at"], "l2t_w": ["method.name=l2t_w"], "l2t_ww": ["method.name=l2t_ww"]}
RUN_ORDER = ["scratch", "fm", "l2t_ww", "at", "l2t_w"]  # the three first: a cut-short study has them
C10_SOURCE = ("sources=[{name: c10, arch: resnet20, taps: [2, 5, 8], "
              "checkpoint: ../shared/weights/akamaster_cifar10_resnet20-12fca82f.th}]")


def plan() -> list[dict]:
    """The runs, most important first (so a cut-short study still answers the main question)."""
    runs = []

    def add(name, job, overrides, **meta):
        runs.append({"name": name, "job": job, "overrides": overrides, **meta})

    for seed, regimes in ((0, (25,)), (1, (25,)), (0, (50, 100)), (1, (50, 100))):
        for per_class in regimes:
            for method in sorted(METHODS, key=RUN_ORDER.index):
                extra = METHODS[method]
                add(f"c10-{per_class}-{method}-s{seed}", "jobs/cifar10_limited.yaml",
                    [*extra, f"data.per_class={per_class}", f"run.seed={seed}"],
                    study="limited", method=method, per_class=per_class, seed=seed, sources="tin")
        if seed == 0 and regimes == (25,):  # multi-source right after the first seed of the main regime
            add("ms-25-l2t_ww-s0", "jobs/multi_source.yaml", ["data.per_class=25", "run.seed=0"],
                study="multi_source", method="l2t_ww", per_class=25, seed=0, sources="tin+c10")
            add("c10src-25-l2t_ww-s0", "jobs/cifar10_limited.yaml",
                ["method.name=l2t_ww", "data.per_class=25", "run.seed=0", C10_SOURCE],
                study="multi_source", method="l2t_ww", per_class=25, seed=0, sources="c10")
    return runs


def command(run: dict) -> list[str]:
    return ["l2t-dist", "train", run["job"], *BUDGET, *run["overrides"], f"run.name={run['name']}",
            "--quiet", "--json"]


def execute(run: dict, results: Path, out_dir: Path) -> dict:
    argv = command(run) + [f"run.out_dir={out_dir}"]
    if (out_dir / run["name"]).exists():  # an interrupted run (no result JSON): start it again, same command
        shutil.rmtree(out_dir / run["name"])
    exe = Path(sys.executable).parent / "l2t-dist"
    started = time.time()
    proc = subprocess.run([str(exe) if exe.exists() else "l2t-dist", *argv[1:]], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{run['name']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    history = [json.loads(line) for line in (out_dir / run["name"] / "metrics.jsonl").read_text().splitlines()]
    record = {**run, "command": shlex.join(command(run)), "wall_s": round(time.time() - started, 1),
              "best_val_acc": summary["best_val_acc"], "best_epoch": summary["best_epoch"],
              "test_acc_at_best_val": summary["test_acc_at_best_val"], "final_test_acc": summary["final_test_acc"],
              "images_per_s": summary["images_per_s"], "final_pairs": summary.get("pairs") or {},
              "history": [{k: h.get(k) for k in ("epoch", "train_loss", "train_acc", "val_acc", "test_acc", "pairs")}
                          for h in history]}
    (results / f"{run['name']}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def load(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)} seeds)"


def table(records: list[dict]) -> str:
    lines = ["| images per class | method | test acc at best val, mean ± sd | per seed (best val epoch) |",
             "|---|---|---|---|"]
    limited = [r for r in records if r["study"] == "limited"]
    for per_class in sorted({r["per_class"] for r in limited}):
        for method in METHODS:
            rs = sorted((r for r in limited if r["per_class"] == per_class and r["method"] == method),
                        key=lambda r: r["seed"])
            if rs:
                seeds = ", ".join(f"s{r['seed']}: {r['test_acc_at_best_val']:.2f} (ep {r['best_epoch']})" for r in rs)
                lines.append(f"| {per_class} | {method} | {_mean_spread([r['test_acc_at_best_val'] for r in rs])} "
                             f"| {seeds} |")
    multi = [r for r in records if r["study"] == "multi_source"]
    if multi:
        lines += ["", "| sources | test acc at best val (seed 0) | best val (epoch) |", "|---|---|---|"]
        for r in multi:
            lines.append(f"| {r['sources']} | {r['test_acc_at_best_val']:.2f} | {r['best_val_acc']:.2f} "
                         f"({r['best_epoch']}) |")
    return "\n".join(lines)


def lambda_table(record: dict, epochs: tuple = (1, 5, 10, 15, 20)) -> str:
    """λ of every pair at a few epochs (the mean over the val set, as logged), deepest first,
    plus the mean per source: where the where-network leans over training."""
    hist = {h["epoch"]: h.get("pairs") or {} for h in record["history"]}
    epochs = tuple(e for e in epochs if e in hist)
    names = sorted(hist[epochs[-1]], key=lambda n: -hist[epochs[-1]][n]["lambda"])
    lines = ["| pair | " + " | ".join(f"λ ep {e}" for e in epochs) + f" | entropy ep {epochs[-1]} |",
             "|---|" + "---|" * (len(epochs) + 1)]
    for n in names:
        lines.append(f"| `{n}` | " + " | ".join(f"{hist[e][n]['lambda']:.3f}" for e in epochs)
                     + f" | {hist[epochs[-1]][n]['entropy']:.3f} |")
    for source in sorted({n.split(":")[0] for n in names}):
        mean = [statistics.mean(v["lambda"] for k, v in hist[e].items() if k.startswith(source + ":")) for e in epochs]
        lines.append(f"| mean over `{source}` | " + " | ".join(f"{m:.3f}" for m in mean) + " | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "real_data"))
    ap.add_argument("--out-dir", default=str(ROOT / "runs" / "study"), help="run directories (not committed)")
    ap.add_argument("--only", default=None, help="run only the runs whose name contains this text")
    ap.add_argument("--list", action="store_true", help="print the plan and the commands, run nothing")
    ap.add_argument("--table", action="store_true", help="print the tables from the results, run nothing")
    ap.add_argument("--lambdas", metavar="RUN", help="print the λ of RUN's pairs over training, run nothing")
    ap.add_argument("--heatmap", nargs=2, metavar=("RUN", "PNG"), help="draw RUN's final λ heat-map, run nothing")
    args = ap.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(table(load(results)))
        return
    if args.lambdas:
        print(lambda_table(json.loads((results / f"{args.lambdas}.json").read_text())))
        return
    if args.heatmap:
        from l2t_dist.tracking.plots import lambda_heatmap

        record = json.loads((results / f"{args.heatmap[0]}.json").read_text())
        title = f"{record['name']}: learned λ after {record['history'][-1]['epoch']} epochs"
        print(lambda_heatmap(record["final_pairs"], Path(args.heatmap[1]), title))
        return
    for run in plan():
        if args.only and args.only not in run["name"]:
            continue
        done = (results / f"{run['name']}.json").exists()
        if args.list:
            print(f"{'done' if done else 'todo'}  {shlex.join(command(run))}")
            continue
        if done:
            continue
        print(f"[study] {run['name']} ...", flush=True)
        r = execute(run, results, Path(args.out_dir))
        print(f"[study] {run['name']}: test {r['test_acc_at_best_val']:.2f}% at best val {r['best_val_acc']:.2f}% "
              f"(epoch {r['best_epoch']}), {r['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
