"""Summarise training runs: RUNS/<method>_s<seed>/metrics.jsonl -> a table and RUNS/summary.json.

    python benchmarks/results/gpu/summarize.py RUNS_DIR

Per run: epochs done, best val accuracy and the test accuracy at its epoch (the first epoch
reaching the best val, as the trainer keeps it), the final test accuracy, and for L2T-ww the
mean λ per pair on the val images at the last epoch.
"""

import json
import statistics
import sys
from pathlib import Path


def summarise(run_dir: Path) -> dict:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    best = None
    for r in recs:
        if r.get("val_acc") is not None and (best is None or r["val_acc"] > best["val_acc"]):
            best = r
    last = recs[-1] if recs else {}
    method, _, seed = run_dir.name.rpartition("_s")
    return {"run": run_dir.name, "method": method, "seed": int(seed) if seed.isdigit() else seed,
            "epochs": len(recs), "best_val_acc": best and best["val_acc"], "best_epoch": best and best["epoch"],
            "test_at_best_val": best and best["test_acc"], "final_val_acc": last.get("val_acc"),
            "final_test_acc": last.get("test_acc"),
            "median_train_images_per_s": statistics.median(r["images_per_s"] for r in recs) if recs else None,
            "lambda_last": {k: v["lambda"] for k, v in (last.get("pairs") or {}).items()}}


def main() -> None:
    root = Path(sys.argv[1])
    rows = [summarise(d) for d in sorted(root.iterdir()) if (d / "metrics.jsonl").exists()]
    (root / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"{'run':<14}{'epochs':>7}{'best val':>10}{'@epoch':>7}{'test@best':>10}{'final test':>11}")
    for r in rows:
        print(f"{r['run']:<14}{r['epochs']:>7}{r['best_val_acc'] or float('nan'):>10.2f}{r['best_epoch'] or 0:>7}"
              f"{r['test_at_best_val'] or float('nan'):>10.2f}{r['final_test_acc'] or float('nan'):>11.2f}")
        if r["lambda_last"]:
            print("   lambda: " + " ".join(f"{k}={v:.3f}" for k, v in r["lambda_last"].items()))


if __name__ == "__main__":
    main()
