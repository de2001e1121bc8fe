"""Rebuild study result JSONs (benchmarks/real_data_study.py's format) from run directories.

Why: the device tool brings back at most a few files per call, so 10 of the 18 result JSONs of
the 2026-11-30 GPU call stayed behind; runs.tar.gz (every run's metrics.jsonl) came back. The
record is rebuilt with the trainer's own rule (best = the first evaluated epoch with the highest
val accuracy; test at that epoch) and checked against the JSONs that did come back:

    python benchmarks/results/real_data_gpu/rebuild.py RUNS_DIR LOG.txt RETURNED_DIR OUT_DIR
"""

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import real_data_study as study  # noqa: E402

def rebuild(run: dict, run_dir: Path, wall_s: float, device: str, shared: str, extra: tuple) -> dict:
    """The record from the run's metrics.jsonl alone; the summary the trainer would have printed
    is recomputed with its rule (strictly better val wins, so the first of equal epochs)."""
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = {"val_acc": -1.0, "test_acc": None, "epoch": 0}
    for h in history:
        if h["val_acc"] is not None and h["val_acc"] > best["val_acc"]:
            best = {"val_acc": h["val_acc"], "test_acc": h["test_acc"], "epoch": h["epoch"]}
    summary = {"best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "test_acc_at_best_val": best["test_acc"],
               "final_test_acc": history[-1]["test_acc"], "images_per_s": history[-1]["images_per_s"],
               "pairs": history[-1].get("pairs")}
    return {**study.make_record(run, study.command(run, device, shared, extra), device, wall_s, summary, history),
            "rebuilt_from": "metrics.jsonl"}


def main() -> None:
    runs_dir, log, returned, out = map(Path, sys.argv[1:5])
    walls = {m[1]: float(m[2]) for m in re.finditer(r"\[study\] (\S+): test .*?, (\d+) s", log.read_text())}
    plan = {r["name"]: r for r in study.plan()}
    for run_dir in sorted(p for p in runs_dir.iterdir() if (p / "metrics.jsonl").exists()):
        name = run_dir.name
        record = rebuild(plan[name], run_dir, walls[name], "cuda", "gpu_carry", ("run.threads=1",))
        if (returned / f"{name}.json").exists():  # the check: same numbers as the JSON that came back
            got = json.loads((returned / f"{name}.json").read_text())
            for k in ("command", "best_val_acc", "best_epoch", "test_acc_at_best_val", "final_test_acc",
                      "images_per_s", "history"):
                assert got[k] == record[k], (name, k)
            assert round(got["wall_s"]) == record["wall_s"], (name, "wall_s")
            record = got
        (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(name, record["test_acc_at_best_val"], record.get("rebuilt_from", "returned"))


if __name__ == "__main__":
    main()
