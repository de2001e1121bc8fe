"""`l2t-dist models sync RUN_DIR`: complete the MLflow run of a run directory after its
tracking server stopped answering (tracking/callback.py leaves RUN_DIR/mlflow_pending.json).

Everything comes from RUN_DIR: mlflow_run.json (which run, which store), metrics.jsonl (every
epoch), mlflow_pending.json (the summary on_end could not send, the status the run ended
with), best.pt and last.pt. The same code as on_end sends it (tracking/finish.py), so the run
ends as if the server had never gone: every epoch's metrics, the final metrics and artifacts,
the model registered with the champion rule, and its status. Running it twice sends nothing
twice.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Optional

from l2t_dist.errors import ConfigError
from l2t_dist.tracking import runs


def sync_run(run_dir, tracking_uri: Optional[str] = None) -> dict:
    """Send what the MLflow run of `run_dir` lacks; `tracking_uri` overrides the stored store
    (the same backend served from elsewhere). Returns what was done."""
    from mlflow.exceptions import MlflowException

    from l2t_dist.tracking.finish import RunRef, backfill, complete, history_of
    from l2t_dist.tracking.registry import RegistryError
    from l2t_dist.tracking.uri import check_tracking_uri, resolve_tracking_uri

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist; give the RUN_DIR of a tracked "
                          "`l2t-dist train` run (OUT_DIR/NAME)")
    prior = runs.read_run_file(run_dir)
    if prior is None:
        raise ConfigError(f"{str(run_dir)!r} has no readable mlflow_run.json: it was not tracked in MLflow, so "
                          "there is nothing to sync")
    uri = resolve_tracking_uri({"uri": tracking_uri}) if tracking_uri else prior["tracking_uri"]
    check_tracking_uri(uri)
    run_id = prior["run_id"]
    c = runs.client(uri)
    try:
        run = c.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"MLflow at {uri} has no run {run_id} (the run of {run_dir}); point --tracking-uri at "
                          "the store it was tracked in") from None
    ref = RunRef(uri, run_id, prior.get("experiment_id") or run.info.experiment_id, run_dir,
                 prior.get("tracking") or {})
    pending = runs.read_pending(run_dir) or {}
    result = {"run_dir": str(run_dir), "tracking_uri": uri, "run_id": run_id, "epochs_sent": 0,
              "model_uri": None, "registered": None, "status": run.info.status}
    try:
        result["epochs_sent"] = backfill(c, ref)
        status = pending.get("status")
        if pending.get("summary"):
            from l2t_dist.train.state import RunSummary

            known = {f.name for f in fields(RunSummary)}
            summary = RunSummary(**{k: v for k, v in pending["summary"].items() if k in known})
            history = history_of(runs.epoch_records(run_dir))
            result.update(complete(c, ref, summary, history, int(pending.get("epochs_here") or 0)))
            status = status or "FINISHED"
        if status:
            c.set_terminated(run_id, status=status)
            result["status"] = status
    except MlflowException as exc:
        raise RegistryError(f"MLflow at {uri} failed while syncing {run_dir}: {exc.message}; run "
                            f"`l2t-dist models sync {run_dir}` again once it answers") from None
    runs.clear_pending(run_dir)
    if result["status"] == "RUNNING":
        result["note"] = (f"run {run_id} is RUNNING in MLflow and {run_dir} holds no summary to complete it with; if "
                          f"its training stopped, finish it with `l2t-dist train --resume {run_dir}`")
    return result


def describe(result: dict) -> str:
    """One line for the terminal."""
    parts = [f"{result['epochs_sent']} epoch(s) sent"]
    reg = result.get("registered")
    if reg:
        parts.append(f"model {reg['model_uri']} ({'champion' if reg.get('champion') else 'not champion'})")
    elif result.get("model_uri"):
        parts.append(f"model {result['model_uri']}")
    parts.append(f"status {result['status']}")
    line = f"synced {result['run_dir']} to MLflow run {result['run_id']} at {result['tracking_uri']}: "
    return line + "; ".join(parts) + (f"\nnote: {result['note']}" if result.get("note") else "")
