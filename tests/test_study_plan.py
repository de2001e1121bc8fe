"""The real-data study's plan (benchmarks/real_data_study.py) stays runnable: every command it
would run parses with the real CLI and validates as a job (no training), also in the form that
reads the data and checkpoints from a carried copy on a GPU box; the result files it wrote
still agree with the plan (same names, same commands)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from l2t_dist import cli
from l2t_dist.config import load_job

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import real_data_study as study  # noqa: E402

PLAN = study.plan((0, 1, 2))


def _job(argv: list[str]):
    assert argv[:2] == ["l2t-dist", "train"], argv
    args = cli._parse(cli.build_parser(), argv[1:])
    return load_job(str(ROOT / args.job), args.overrides)


def test_names_are_unique_and_the_default_plan_is_part_of_the_full_one():
    names = [r["name"] for r in PLAN]
    assert len(names) == len(set(names))
    assert {r["name"] for r in study.plan()} <= set(names)


@pytest.mark.parametrize("shared", [None, "gpu_carry"])
def test_every_command_validates(shared):
    for run in PLAN:
        job = _job(study.command(run, "cuda" if shared else "cpu", shared))
        assert job.data.per_class == run["per_class"] and job.run.seed == run["seed"], run["name"]
        assert [s.name for s in job.sources] == [n for n in run["sources"].split("+") if n], run["name"]
        epochs = study.SAME_STEPS[run["per_class"]] if run["study"] == "same_steps" else 20
        assert job.optim.epochs == epochs, run["name"]
        paths = [job.data.path, *(s.checkpoint for s in job.sources)] + [job.target.checkpoint] * bool(
            job.target.checkpoint)
        if shared:  # nothing may still point at ../shared, which a GPU box does not have
            assert job.run.device == "cuda"
            assert all(str(p).startswith("gpu_carry/") for p in paths), (run["name"], paths)
        else:
            assert all(str(p).startswith("../shared/") for p in paths), (run["name"], paths)


def test_finetune_runs_start_from_the_tinyimagenet_resnet32():
    """The finetune rows: the source network itself, as the target, on the same budget as the others."""
    runs = [r for r in PLAN if r["method"] == "finetune"]
    assert {(r["per_class"], r["seed"]) for r in runs} >= {(25, 0), (25, 1), (50, 0), (50, 1)}
    for run in runs:
        job = _job(study.command(run))
        assert job.method.name == "finetune" and job.sources == [] and job.target.arch == "l2t_resnet32"
        assert job.target.checkpoint == "../shared/" + study.CHECKPOINTS["tin"]
        assert (job.optim.epochs, job.optim.lr, job.data.batch_size) == (20, 0.01, 32)


def test_source_checkpoints_are_the_sources_own():
    """A moved checkpoint must stay with its source: tin's file for tin, c10's for c10."""
    for run in PLAN:
        job = _job(study.command(run, "cuda", "gpu_carry"))
        for s in job.sources:
            assert Path(str(s.checkpoint)).name == Path(study.CHECKPOINTS[s.name]).name, (run["name"], s)


@pytest.mark.parametrize("results", ["real_data", "real_data_gpu"])
def test_committed_results_match_the_plan(results):
    """Each result file is a planned run, and its recorded command is the plan's (plus the
    recorded extras), so `--table` numbers trace back to a command that still validates."""
    files = sorted((ROOT / "benchmarks" / "results" / results).glob("*.json"))
    assert files, f"no result files in benchmarks/results/{results}"
    by_name = {r["name"]: r for r in PLAN}
    for f in files:
        record = json.loads(f.read_text())
        run = by_name[record["name"]]
        argv = shlex.split(record["command"])
        planned = study.command(run, record.get("device", "cpu"),
                                "gpu_carry" if "gpu_carry" in record["command"] else None)
        assert argv[:len(planned) - 3] == planned[:-3], f.name  # all but the extras and the name/flags
        assert record["test_acc_at_best_val"] == next(h["test_acc"] for h in record["history"]
                                                      if h["epoch"] == record["best_epoch"]), f.name
        _job(argv)
