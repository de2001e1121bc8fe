"""The real-data study of docs/results.md: CIFAR-10 limited data (the paper's five methods and
the all-to-all `fm` control), several seeds, the two-source runs and a same-steps comparison,
each run one `l2t-dist train` command.

Every finished run leaves one small JSON in --results (the exact command, its seed, the best
val epoch, the test accuracy there, the λ of every pair after every epoch), so the study can
be stopped and continued: a run whose JSON exists is skipped. `--table` prints the Markdown
tables of docs/results.md from those files (mean and spread over seeds).

    python benchmarks/real_data_study.py --list                 # the plan, in order
    python benchmarks/real_data_study.py --only 25              # runs whose name contains "25"
    python benchmarks/real_data_study.py --table                # the tables, from the JSON files
    python benchmarks/real_data_study.py --gains                # gain over scratch per regime
    python benchmarks/real_data_study.py --only mlr             # issue 17: l2t_ww at meta.lr 1e-3, 3e-3, 3e-4 (25
                                                                # per class) and the best of them at 50
    python benchmarks/real_data_study.py --meta-lr              # ... and its table beside meta.lr 1e-4 and fm_a2a
    python benchmarks/real_data_study.py --compare benchmarks/results/real_data_gpu   # CPU vs GPU runs
    python benchmarks/real_data_study.py --lambdas c10-25-l2t_ww-s0   # λ per pair over training
    python benchmarks/real_data_study.py --heatmap c10-25-l2t_ww-s0 docs/img/lambda_c10_25.png
    python benchmarks/real_data_study.py --change-heatmap d.png c10-100-l2t_ww-s0 c10-100-l2t_ww-s1
    python benchmarks/real_data_study.py --device cuda --shared gpu_carry --parallel 12 --only c10-100
                                                                # the same commands on a GPU box, 12 at once

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET = ["data.batch_size=32", "data.val_fraction=0.02", "optim.lr=0.01", "optim.epochs=20",
          "run.eval_every=5", "run.threads=2", "tracking.enabled=false"]
# method -> overrides; fm and at on one-to-one pairs (the paper's baselines), l2t_ww all-to-all
METHODS = {"scratch": ["method.name=scratch"], "fm": ["method.name=fm", "method.pairs=one_to_one"],
           "at": ["method.name=at"], "l2t_w": ["method.name=l2t_w"], "l2t_ww": ["method.name=l2t_ww"],
           # the control for l2t_ww: the same 15 all-to-all pairs, fixed uniform weights, no meta-learning
           "fm_a2a": ["method.name=fm", "method.pairs=all_to_all"],
           # the practitioner's baseline: fine-tune the source network itself (its architecture, its
           # TinyImageNet weights, a new 10-class head), no source and no VGG9
           "finetune": ["method.name=finetune", "sources=[]", "target.arch=l2t_resnet32", "target.taps=null",
                        "target.checkpoint=../shared/weights/l2tww_tinyimagenet200_resnet32_model_best.pth.tar"]}
RUN_ORDER = ["scratch", "fm", "l2t_ww", "at", "l2t_w", "fm_a2a", "finetune"]  # the three first: a
# cut-short study has them
NO_SOURCE = {"finetune"}  # methods whose runs list no source (their `sources` is "")
C10_SOURCE = ("sources=[{name: c10, arch: resnet20, taps: [2, 5, 8], "
              "checkpoint: ../shared/weights/akamaster_cifar10_resnet20-12fca82f.th}]")
CHECKPOINTS = {"tin": "weights/l2tww_tinyimagenet200_resnet32_model_best.pth.tar",
               "c10": "weights/akamaster_cifar10_resnet20-12fca82f.th"}  # under ../shared
# "more data" or "more steps"? 50 and 100 images per class at the step count of 25 for 20 epochs
SAME_STEPS = {50: 10, 100: 5}  # images per class -> epochs (160 SGD steps of batch 32 each)
META_LRS = ("1e-3", "3e-3", "3e-4")  # issue 17's meta learning rates (the job files' is the paper's 1e-4)
META_LR_BEST = "3e-4"  # the best of META_LRS at 25 per class (mean over 2 seeds), run again at 50 per class
# the Tune sweep's best trial (tune_spaces/meta_lr_beta.yaml, chosen on val: meta.lr 7.04e-4, beta
# 1.2513), rounded; fm_a2a runs at its beta: is its gain the learned weights' or the larger beta's?
TUNED = {"meta_lr": "7e-4", "beta": "1.25"}


def plan(seeds: tuple = (0, 1)) -> list[dict]:
    """The runs, most important first (so a cut-short study still answers the main question).
    Seeds past 1 (a GPU box has time for them) add every regime once more, at the end."""
    runs = []

    def add(name, job, overrides, **meta):
        runs.append({"name": name, "job": job, "overrides": overrides, **meta})

    order = [(0, (25,)), (1, (25,)), (0, (50, 100)), (1, (50, 100))]
    order = [(s, r) for s, r in order if s in seeds] + [(s, (25, 50, 100)) for s in seeds if s > 1]
    for seed, regimes in order:
        for per_class in regimes:
            for method in sorted(METHODS, key=RUN_ORDER.index):
                extra = METHODS[method]
                add(f"c10-{per_class}-{method}-s{seed}", "jobs/cifar10_limited.yaml",
                    [*extra, f"data.per_class={per_class}", f"run.seed={seed}"],
                    study="limited", method=method, per_class=per_class, seed=seed,
                    sources="" if method in NO_SOURCE else "tin")
        if seed == 0 and regimes == (25,):  # multi-source right after the first seed of the main regime
            add("ms-25-l2t_ww-s0", "jobs/multi_source.yaml", ["data.per_class=25", "run.seed=0"],
                study="multi_source", method="l2t_ww", per_class=25, seed=0, sources="tin+c10")
            add("c10src-25-l2t_ww-s0", "jobs/cifar10_limited.yaml",
                ["method.name=l2t_ww", "data.per_class=25", "run.seed=0", C10_SOURCE],
                study="multi_source", method="l2t_ww", per_class=25, seed=0, sources="c10")
    # later additions, run on a GPU box first: multi-source at 25 (more seeds) and at 100 (4x the
    # meta-steps), the single-source c10 control beside it, and the same-steps comparison
    for seed in seeds:
        for per_class in (25, 100):
            if (per_class, seed) != (25, 0):
                add(f"ms-{per_class}-l2t_ww-s{seed}", "jobs/multi_source.yaml",
                    [f"data.per_class={per_class}", f"run.seed={seed}"], study="multi_source",
                    method="l2t_ww", per_class=per_class, seed=seed, sources="tin+c10")
                add(f"c10src-{per_class}-l2t_ww-s{seed}", "jobs/cifar10_limited.yaml",
                    ["method.name=l2t_ww", f"data.per_class={per_class}", f"run.seed={seed}", C10_SOURCE],
                    study="multi_source", method="l2t_ww", per_class=per_class, seed=seed, sources="c10")
        for per_class, epochs in SAME_STEPS.items():
            for method in ("scratch", "l2t_ww", "fm_a2a"):
                add(f"c10-{per_class}-{method}-s{seed}-e{epochs}", "jobs/cifar10_limited.yaml",
                    [*METHODS[method], f"data.per_class={per_class}", f"run.seed={seed}", f"optim.epochs={epochs}"],
                    study="same_steps", method=method, per_class=per_class, seed=seed, sources="tin")
    # issue 17: does learning what and where pay off with a larger meta-lr? 25 images per class
    for seed in seeds:
        for mlr in META_LRS:
            add(f"c10-25-l2t_ww-mlr{mlr}-s{seed}", "jobs/cifar10_limited.yaml",
                [*METHODS["l2t_ww"], f"meta.lr={mlr}", "data.per_class=25", f"run.seed={seed}"],
                study="meta_lr", method="l2t_ww", per_class=25, seed=seed, sources="tin", meta_lr=mlr)
    for seed in seeds:  # the Tune sweep's best values (its seed-0 trial is seed 0), and the fixed-weight
        mlr, beta = TUNED["meta_lr"], TUNED["beta"]  # control at the same beta
        if seed > 0:
            add(f"c10-25-l2t_ww-mlr{mlr}-b{beta}-s{seed}", "jobs/cifar10_limited.yaml",
                [*METHODS["l2t_ww"], f"meta.lr={mlr}", f"method.beta={beta}", "data.per_class=25", f"run.seed={seed}"],
                study="meta_lr", method="l2t_ww", per_class=25, seed=seed, sources="tin", meta_lr=mlr, beta=beta)
        add(f"c10-25-fm_a2a-b{beta}-s{seed}", "jobs/cifar10_limited.yaml",
            [*METHODS["fm_a2a"], f"method.beta={beta}", "data.per_class=25", f"run.seed={seed}"],
            study="meta_lr", method="fm_a2a", per_class=25, seed=seed, sources="tin", beta=beta)
    for seed in seeds:  # ... and the best of them with twice the data
        add(f"c10-50-l2t_ww-mlr{META_LR_BEST}-s{seed}", "jobs/cifar10_limited.yaml",
            [*METHODS["l2t_ww"], f"meta.lr={META_LR_BEST}", "data.per_class=50", f"run.seed={seed}"],
            study="meta_lr", method="l2t_ww", per_class=50, seed=seed, sources="tin", meta_lr=META_LR_BEST)
    return runs


def _cost(run: dict) -> float:
    """A run's rough relative duration: images x epochs x (pairs and meta-steps) x sources."""
    epochs = SAME_STEPS[run["per_class"]] if run["study"] == "same_steps" else 20
    return (run["per_class"] * epochs * {"l2t_ww": 4, "l2t_w": 3.5}.get(run["method"], 1)
            * len(run["sources"].split("+")))


def command(run: dict, device: str = "cpu", shared: str | None = None, extra: tuple = ()) -> list[str]:
    """The documented command of a run. Off the development machine (a GPU box) the data and the
    checkpoints sit under `shared` instead of ../shared, and the run goes to `run.device=device`."""
    overrides, moved = list(run["overrides"]), []
    if shared is not None:
        overrides = [o.replace("../shared/", f"{shared}/") for o in overrides]
        moved = [f"data.path={shared}/data/cifar10-jpeg"]
        if not any(o.startswith("sources=") for o in overrides):  # the job file's own sources
            moved += [f"sources.{i}.checkpoint={shared}/{CHECKPOINTS[name]}"
                      for i, name in enumerate(run["sources"].split("+"))]
    on_device = [f"run.device={device}"] if device != "cpu" else []
    return ["l2t-dist", "train", run["job"], *BUDGET, *overrides, *moved, *on_device, *extra,
            f"run.name={run['name']}", "--quiet", "--json"]


def make_record(run: dict, argv: list[str], device: str, wall_s: float, summary: dict, history: list[dict]) -> dict:
    """A result file's content: the run, its command, the trainer's summary and the per-epoch log."""
    return {**run, "device": device, "command": shlex.join(argv), "wall_s": wall_s,
            "best_val_acc": summary["best_val_acc"], "best_epoch": summary["best_epoch"],
            "test_acc_at_best_val": summary["test_acc_at_best_val"], "final_test_acc": summary["final_test_acc"],
            "images_per_s": summary["images_per_s"], "final_pairs": summary.get("pairs") or {},
            "history": [{k: h.get(k) for k in ("epoch", "train_loss", "train_acc", "val_acc", "test_acc", "pairs")}
                        for h in history]}


def execute(run: dict, results: Path, out_dir: Path, device: str = "cpu", shared: str | None = None,
            timeout: float | None = None, extra: tuple = ()) -> dict:
    argv = command(run, device, shared, extra) + [f"run.out_dir={out_dir}"]
    if (out_dir / run["name"]).exists():  # an interrupted run (no result JSON): start it again, same command
        shutil.rmtree(out_dir / run["name"])
    exe = Path(sys.executable).parent / "l2t-dist"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "l2t_dist.cli"]  # GPU boxes: no script
    started = time.time()
    try:
        proc = subprocess.run([*launcher, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{run['name']} ran past --timeout {timeout} s; its epochs so far are in "
                           f"{out_dir / run['name'] / 'metrics.jsonl'}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{run['name']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    history = [json.loads(line) for line in (out_dir / run["name"] / "metrics.jsonl").read_text().splitlines()]
    record = make_record(run, command(run, device, shared, extra), device, round(time.time() - started, 1),
                         summary, history)
    (results / f"{run['name']}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def load(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)} seeds)"


def _seed_row(per_class: int, label: str, rs: list[dict]) -> str:
    """One table row: the mean ± sd over the runs' seeds, then each seed (its best val epoch)."""
    rs = sorted(rs, key=lambda r: r["seed"])
    seeds = ", ".join(f"s{r['seed']}: {r['test_acc_at_best_val']:.2f} (ep {r['best_epoch']}"
                      f"{', GPU' if r.get('device', 'cpu') != 'cpu' else ''})" for r in rs)
    return f"| {per_class} | {label} | {_mean_spread([r['test_acc_at_best_val'] for r in rs])} | {seeds} |"


def table(records: list[dict]) -> str:
    lines = ["| images per class | method | test acc at best val, mean ± sd | per seed (best val epoch) |",
             "|---|---|---|---|"]
    limited = [r for r in records if r["study"] == "limited"]
    for per_class in sorted({r["per_class"] for r in limited}):
        for method in METHODS:
            rs = [r for r in limited if r["per_class"] == per_class and r["method"] == method]
            if rs:
                lines.append(_seed_row(per_class, method, rs))
    multi = [r for r in records if r["study"] == "multi_source"]
    if multi:
        lines += ["", "| images per class | sources | test acc at best val, mean ± sd | per seed (best val epoch) |",
                  "|---|---|---|---|"]
        for per_class in sorted({r["per_class"] for r in multi}):
            for sources in sorted({r["sources"] for r in multi if r["per_class"] == per_class}):
                lines.append(_seed_row(per_class, sources, [r for r in multi if r["per_class"] == per_class
                                                           and r["sources"] == sources]))
    same = [r for r in records if r["study"] == "same_steps"]
    if same:
        lines += ["", "| images per class | epochs (SGD steps) | method | test acc at best val, mean ± sd |",
                  "|---|---|---|---|"]
        for (per_class, method), accs in sorted(_cells(same, "same_steps").items()):
            epochs = SAME_STEPS[per_class]
            lines.append(f"| {per_class} | {epochs} ({epochs * -(-per_class * 10 // 32)}) | {method} "
                         f"| {_mean_spread(accs)} |")
    return "\n".join(lines)


def _cells(records: list[dict], study: str = "limited") -> dict:
    """(per_class, method) -> test accuracies at best val, of one study's runs."""
    cells: dict = {}
    for r in records:
        if r["study"] == study:
            cells.setdefault((r["per_class"], r["method"]), []).append(r["test_acc_at_best_val"])
    return cells


def gains_table(records: list[dict]) -> str:
    """Each transfer method's gain over scratch per regime (difference of the seed means), in
    points and as the relative reduction of the test error: does transfer help more with less data?"""
    cells = _cells(records)
    methods = [m for m in METHODS if m != "scratch"]
    lines = ["| images per class | scratch | " + " | ".join(f"{m} gain" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for per_class in sorted({k[0] for k in cells}):
        base = cells.get((per_class, "scratch"))
        if not base:
            continue
        b = statistics.mean(base)
        row = []
        for m in methods:
            v = cells.get((per_class, m))
            row.append(f"{statistics.mean(v) - b:+.2f} ({(statistics.mean(v) - b) / (100 - b):.1%})" if v else "")
        lines.append(f"| {per_class} | {b:.2f} ({len(base)}) | " + " | ".join(row) + " |")
    return "\n".join(lines)


def compare_table(first: list[dict], second: list[dict]) -> str:
    """The runs present in both result sets (e.g. the CPU's and a GPU box's), side by side: how far
    two devices running one command agree, against the spread between seeds."""
    other = {r["name"]: r for r in second}
    both = [(r, other[r["name"]]) for r in first if r["name"] in other]
    lines = ["| run | first | second | second - first |", "|---|---|---|---|"]
    for a, b in both:
        d = b["test_acc_at_best_val"] - a["test_acc_at_best_val"]
        lines.append(f"| `{a['name']}` | {a['test_acc_at_best_val']:.2f} ({a.get('device', 'cpu')}) "
                     f"| {b['test_acc_at_best_val']:.2f} ({b.get('device', 'cpu')}) | {d:+.2f} |")
    if both:
        diffs = [b["test_acc_at_best_val"] - a["test_acc_at_best_val"] for a, b in both]
        lines.append(f"| {len(both)} runs | | | mean {statistics.mean(diffs):+.2f}, "
                     f"mean abs {statistics.mean(abs(d) for d in diffs):.2f}, max abs {max(map(abs, diffs)):.2f} |")
    return "\n".join(lines)


def lambda_change(records: list[dict]) -> dict:
    """Per pair, the change of λ from the first logged epoch to the last, averaged over runs.
    The where-network starts from a random draw per seed, so the change (not the final value)
    is what several seeds can agree on."""
    per_pair: dict = {}
    for r in records:
        first, last = r["history"][0]["pairs"], r["history"][-1]["pairs"]
        for k in last:
            per_pair.setdefault(k, []).append(last[k]["lambda"] - first[k]["lambda"])
    return {k: statistics.mean(v) for k, v in per_pair.items()}


DEEP_RISE = ("tin:block14->stage3", "tin:block14->stage4")  # rose in all 3 seeds at 100 images per class
DEEP_TO_SHALLOW = ("tin:block14->stage1", "tin:block14->stage2")  # fell there


def movement(record: dict) -> dict:
    """How far the what- and where-networks moved in one run, epoch 1 to the last: the largest
    |Δλ|, the mean λ, the mean Δλ of the pairs that rose at 100 images per class (the deepest source
    block to the two deepest target stages) and of that block to the shallow stages, and the lowest
    channel-weight entropy (uniform is ln C: 2.773 for the 16-channel taps, more for wider ones)."""
    first, last = record["history"][0]["pairs"], record["history"][-1]["pairs"]
    delta = lambda_change([record])
    mean = lambda keys: statistics.mean(delta[k] for k in keys if k in delta)  # noqa: E731
    return {"max_abs_dlambda": max(map(abs, delta.values())),
            "mean_lambda": (statistics.mean(v["lambda"] for v in first.values()),
                            statistics.mean(v["lambda"] for v in last.values())),
            "deep_rise": mean(DEEP_RISE), "deep_to_shallow": mean(DEEP_TO_SHALLOW),
            "min_entropy": min(v["entropy"] for v in last.values())}


def meta_lr_table(records: list[dict], per_class: int = 25) -> str:
    """Issue 17's table: l2t_ww at each meta.lr (the job files' 1e-4 from the main study) beside
    the fixed all-to-all control fm_a2a, with how far λ and the channel weights moved; then the
    Tune sweep's best values beside fm_a2a at the same β."""
    lines = ["| method | meta.lr | β | test acc at best val, mean ± sd | per seed | largest \\|Δλ\\| "
             "| mean λ ep 1 → last | Δλ deepest → 2 deepest / → shallow | lowest entropy |",
             "|---|---|---|---|---|---|---|---|---|"]

    def setting(r: dict):  # (β, method, meta.lr) of an issue-17 row; the main study's runs are the paper's
        if r["study"] == "limited" and r["method"] in ("fm_a2a", "l2t_ww"):
            return 0.5, r["method"], "-" if r["method"] == "fm_a2a" else "1e-4"
        if r["study"] == "meta_lr":
            return float(r.get("beta", 0.5)), r["method"], r.get("meta_lr", "-")
        return None

    groups: dict = {}
    for r in records:
        if setting(r) is not None:
            groups.setdefault(setting(r), []).append(r)
    order = sorted(groups, key=lambda k: (k[0], k[1] != "fm_a2a", 0.0 if k[2] == "-" else float(k[2])))
    for beta, method, mlr in order:
        rs = sorted((r for r in groups[(beta, method, mlr)] if r["per_class"] == per_class), key=lambda r: r["seed"])
        if not rs:
            continue
        accs = [r["test_acc_at_best_val"] for r in rs]
        seeds = ", ".join(f"s{r['seed']}: {r['test_acc_at_best_val']:.2f}" for r in rs)
        moved = [movement(r) for r in rs] if method == "l2t_ww" else []
        cells = ([", ".join(f"{m['max_abs_dlambda']:.2f}" for m in moved),
                  ", ".join(f"{m['mean_lambda'][0]:.2f} → {m['mean_lambda'][1]:.2f}" for m in moved),
                  ", ".join(f"{m['deep_rise']:+.2f} / {m['deep_to_shallow']:+.2f}" for m in moved),
                  ", ".join(f"{m['min_entropy']:.3f}" for m in moved)] if moved else ["-"] * 4)
        lines.append(f"| {method} | {mlr} | {beta:g} | {_mean_spread(accs)} | {seeds} | " + " | ".join(cells) + " |")
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
    ap.add_argument("--only", nargs="+", default=None, help="run only the runs whose name contains one of these")
    ap.add_argument("--exact", action="store_true", help="--only names whole run names, not parts")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of the plan (default 0 1)")
    ap.add_argument("--device", default="cpu", help="run.device of the runs (cpu, cuda); recorded in each result")
    ap.add_argument("--shared", default=None, help="where data/ and weights/ are, if not ../shared (GPU boxes)")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (a GPU box; on 2 CPU cores keep 1)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run before it is stopped")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more overrides after the budget's (recorded in each result's command)")
    ap.add_argument("--list", action="store_true", help="print the plan and the commands, run nothing")
    ap.add_argument("--table", action="store_true", help="print the tables from the results, run nothing")
    ap.add_argument("--gains", action="store_true", help="print each method's gain over scratch per regime")
    ap.add_argument("--meta-lr", action="store_true",
                    help="print issue 17's meta.lr tables (25 and 50 per class), run nothing")
    ap.add_argument("--compare", metavar="DIR", help="print the runs in both --results and DIR side by side")
    ap.add_argument("--lambdas", metavar="RUN", help="print the λ of RUN's pairs over training, run nothing")
    ap.add_argument("--heatmap", nargs=2, metavar=("RUN", "PNG"), help="draw RUN's final λ heat-map, run nothing")
    ap.add_argument("--change-heatmap", nargs="+", metavar="PNG RUN",
                    help="draw the change of λ from epoch 1 to the last epoch, averaged over the RUNs")
    args = ap.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(table(load(results)))
        return
    if args.gains:
        print(gains_table(load(results)))
        return
    if args.meta_lr:
        records = load(results)
        print("\n\n".join(f"{per_class} images per class:\n\n{meta_lr_table(records, per_class)}"
                          for per_class in (25, 50)))
        return
    if args.compare:
        print(compare_table(load(results), load(Path(args.compare))))
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
    if args.change_heatmap:
        from l2t_dist.tracking.plots import lambda_heatmap

        png, names = Path(args.change_heatmap[0]), args.change_heatmap[1:]
        change = lambda_change([json.loads((results / f"{n}.json").read_text()) for n in names])
        title = f"change of λ from epoch 1 to the last, mean of {len(names)} run{'s' if len(names) > 1 else ''}"
        print(lambda_heatmap({k: {"lambda": v} for k, v in change.items()}, png, title, centered=True,
                             label="Δ mean λ (val batch)"))
        return
    todo, extra = [], tuple(args.set)
    for run in plan(tuple(args.seeds)):
        if args.only and not any(text == run["name"] if args.exact else text in run["name"] for text in args.only):
            continue
        done = (results / f"{run['name']}.json").exists()
        if args.list:
            print(f"{'done' if done else 'todo'}  {shlex.join(command(run, args.device, args.shared, extra))}")
        elif not done:
            todo.append(run)

    def one(run: dict) -> bool:
        print(f"[study] {run['name']} ...", flush=True)
        try:
            r = execute(run, results, Path(args.out_dir), args.device, args.shared, args.timeout, extra)
        except RuntimeError as exc:  # one failed run does not lose the others' results
            print(f"[study] {exc}", flush=True)
            return False
        print(f"[study] {run['name']}: test {r['test_acc_at_best_val']:.2f}% at best val {r['best_val_acc']:.2f}% "
              f"(epoch {r['best_epoch']}), {r['wall_s']:.0f} s", flush=True)
        return True

    if args.parallel > 1:  # longest first, so that the pool's runs end close together
        todo.sort(key=lambda r: -_cost(r))
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        ok = list(pool.map(one, todo))
    if not all(ok):
        raise SystemExit(f"{ok.count(False)} of {len(ok)} runs failed; see the messages above")


if __name__ == "__main__":
    main()
