"""The trainable: one Tune trial is one full training job.

The driver hands every trial the same base job tree (`spec`, through tune.with_parameters)
and Tune hands it the sampled values (`config`, dotted job keys). The trial writes a normal
run directory, OUT_DIR/<sweep>/<trial id> (job.yaml, metrics.jsonl, last.pt, best.pt), and
reports once per epoch, so ASHA sees every epoch's val accuracy:
- backend local: train_local in the trial's process, with a callback that calls
  `ray.tune.report`;
- backend ray: a TorchTrainer started inside the trial (the Train V2 pattern), whose epoch
  reports reach Tune through `TuneReportCallback`.
A trial restarted by `--resume` continues its run directory from last.pt when there is one.
MLflow is written by the driver (tracking.py), never here: a trial stopped by ASHA is killed
and runs no code after its last report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from l2t_dist.config import JobConfig, parse_job
from l2t_dist.tune.space import apply_params, plain

# Reported each epoch (when present), logged per epoch to the trial's MLflow run.
METRICS = ("val_acc", "test_acc", "train_loss", "train_acc", "lr", "images_per_s", "wait_fraction")


def trial_job(base: dict, params: dict[str, Any], sweep_dir: str, trial_id: str) -> JobConfig:
    """The base job with the sampled values applied, writing to SWEEP_DIR/TRIAL_ID, untracked."""
    tree = apply_params(base, {k: plain(v) for k, v in params.items()})
    tree["run"].update(out_dir=str(sweep_dir), name=trial_id, eval_every=1, checkpoint_every=None)
    tree["tracking"]["enabled"] = False
    return parse_job(tree, where=f"trial {trial_id}")


def epoch_metrics(record: dict) -> dict:
    out = {"epoch": int(record["epoch"])}
    out.update({k: float(record[k]) for k in METRICS if record.get(k) is not None})
    return out


class _TuneReporter:
    """A training-loop callback: one tune.report per epoch (blocks until Tune asks for more)."""

    def on_epoch_end(self, run, record: dict) -> None:
        from ray import tune

        tune.report(epoch_metrics(record))


def run_trial(config: dict, spec: dict) -> None:
    """Tune entry point. `spec`: base (job tree), keys (searched), sweep_dir, backend."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    params = {k: config[k] for k in spec["keys"]}
    job = trial_job(spec["base"], params, spec["sweep_dir"], trial_id)
    run_dir = Path(spec["sweep_dir"]) / trial_id
    resume = (run_dir / "last.pt").exists()
    if spec["backend"] == "ray":
        _fit_ray(job, run_dir, resume)
    else:
        _fit_local(job, run_dir, resume)


def _fit_local(job: JobConfig, run_dir: Path, resume: bool) -> None:
    from l2t_dist.train.local import train_local

    if resume and _report_if_done(run_dir):
        return
    train_local(None if resume else job, resume=str(run_dir) if resume else None, quiet=True,
                callbacks=[_TuneReporter()])


def _report_if_done(run_dir: Path) -> bool:
    """A resumed trial whose run had already finished: report its last epoch once more."""
    from ray import tune

    from l2t_dist.train.state import TrainingState

    state = TrainingState.load(run_dir / "last.pt")
    if not state.finished or not state.history:
        return False
    tune.report(epoch_metrics(state.history[-1]))
    return True


def _fit_ray(job: JobConfig, run_dir: Path, resume: bool) -> None:
    """The launcher's `launch` inside a trial: the same worker loop and source actors, plus
    TuneReportCallback; the resources were planned by the driver (plan.py) and are explicit in
    the job's cluster section, so nothing is re-planned against what other trials hold."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from l2t_dist.distributed.launcher import launch
    from l2t_dist.distributed.resources import plan_resources
    from l2t_dist.train.run_dir import RunDir

    if resume and _report_if_done(run_dir):
        return
    rd = RunDir.open(None if resume else job, str(run_dir) if resume else None)
    plan = plan_resources(rd.job.cluster, len(rd.job.sources), {"CPU": 0.0})  # every quantity is explicit
    launch(rd, plan, quiet=True, callbacks=[TuneReportCallback()])


def best_of(rows: list[dict], max_t: int) -> dict:
    """Best-by-val over a trial's reported epochs (the first maximum, as LocalRun keeps best.pt)."""
    best: Optional[dict] = None
    for r in rows:
        v = r.get("val_acc")
        if v is not None and v == v and (best is None or v > best["val_acc"]):
            best = r
    epochs = max((int(r["epoch"]) for r in rows if r.get("epoch") is not None), default=0)
    return {"epochs": epochs, "best_val_acc": None if best is None else best["val_acc"],
            "test_acc_at_best_val": None if best is None else best.get("test_acc"),
            "best_epoch": None if best is None else int(best["epoch"]), "stopped_early": 0 < epochs < max_t}


def error_line(err) -> str:
    """One line for a failed trial: our own error's first line (what went wrong), found under
    Ray's wrappers, else the last line of the error."""
    from l2t_dist.errors import last_line, unwrap_ray_error

    ours = unwrap_ray_error(err)
    if ours is not None:
        return str(ours).strip().splitlines()[0]
    return last_line(err)
