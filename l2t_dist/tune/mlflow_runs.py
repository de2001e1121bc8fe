"""MLflow for a sweep, written on the driver: one parent run, one child run per trial.

Why the driver: a trial that ASHA stops is killed right after its last report, so code in
the trial never gets to end its MLflow run (ENV.md). A Tune Callback sees every trial's
start, results and end on the driver instead, and ends each child with the status that says
what happened: FINISHED (trained all epochs), KILLED (stopped early by the scheduler),
FAILED (raised). Children carry the tag mlflow.parentRunId, the sampled values and the
whole flattened job as params, and the per-epoch metrics with step = epoch.
The callback is pickled with the Tuner (for --resume), so it holds ids, not clients.
"""

from __future__ import annotations

import json
from typing import Optional

from ray.tune import Callback

from l2t_dist.config import flatten
from l2t_dist.tracking.runs import client as _client
from l2t_dist.tracking.runs import log_params
from l2t_dist.tune.trial import METRICS, error_line, trial_job


def start_parent(uri: str, exp_id: str, name: str, tags: dict, params: dict) -> str:
    client = _client(uri)
    run = client.create_run(exp_id, run_name=name, tags=tags)
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def reopen(uri: str, run_id: str) -> None:
    """--resume: the interrupted run goes on (RUNNING again) instead of a new one."""
    _client(uri).update_run(run_id, status="RUNNING")


class MlflowSweepCallback(Callback):
    def __init__(self, uri: str, exp_id: str, parent_run_id: str, base: dict, keys: list[str],
                 sweep_dir: str, max_t: int):
        self.uri, self.exp_id, self.parent = uri, exp_id, parent_run_id
        self.base, self.keys, self.sweep_dir, self.max_t = base, list(keys), sweep_dir, max_t
        self._runs: dict[str, str] = {}
        self._epoch: dict[str, int] = {}
        self._c = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_c"] = None
        return state

    @property
    def client(self):
        if self._c is None:
            self._c = _client(self.uri)
        return self._c

    def child_run_id(self, trial_id: str) -> Optional[str]:
        """The trial's child run: cached, else found by tag (after --resume)."""
        if trial_id not in self._runs:
            runs = self.client.search_runs(
                [self.exp_id], max_results=1,
                filter_string=f"tags.mlflow.parentRunId = '{self.parent}' and tags.`tune.trial_id` = '{trial_id}'")
            if runs:
                self._runs[trial_id] = runs[0].info.run_id
        return self._runs.get(trial_id)

    # ---- Tune hooks (driver)
    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        existing = self.child_run_id(trial.trial_id)
        if existing is not None:
            self.client.update_run(existing, status="RUNNING")
            return
        sampled = {k: trial.config.get(k) for k in self.keys}
        job = trial_job(self.base, sampled, self.sweep_dir, trial.trial_id)
        run = self.client.create_run(self.exp_id, run_name=trial.trial_id, tags={
            "mlflow.parentRunId": self.parent, "tune.trial_id": trial.trial_id,
            "tune.sampled": json.dumps({k: _plain(v) for k, v in sampled.items()}),
            "l2t.run_dir": f"{self.sweep_dir}/{trial.trial_id}"})
        self._runs[trial.trial_id] = run.info.run_id
        log_params(self.client, run.info.run_id, flatten(job))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        from l2t_dist.tracking.runs import log_metrics

        run_id = self.child_run_id(trial.trial_id)
        if run_id is None or result.get("epoch") is None:
            return
        step = int(result["epoch"])
        self._epoch[trial.trial_id] = step
        metrics = {k: float(result[k]) for k in METRICS if isinstance(result.get(k), (int, float))}
        if metrics:
            log_metrics(self.client, run_id, metrics, step)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        epoch = self._epoch.get(trial.trial_id, (trial.last_result or {}).get("epoch") or 0)
        stopped = epoch < self.max_t
        self._end(trial, "KILLED" if stopped else "FINISHED", "stopped early" if stopped else "completed")

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        self._end(trial, "FAILED", "failed", error=_error_text(trial))

    def _end(self, trial, status: str, label: str, error: Optional[str] = None) -> None:
        run_id = self.child_run_id(trial.trial_id)
        if run_id is None:
            return
        self.client.set_tag(run_id, "tune.status", label)
        if error:
            self.client.set_tag(run_id, "tune.error", error[-4000:])
        self.client.set_terminated(run_id, status=status)


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _error_text(trial) -> str:
    """The trial's error as one line. At on_trial_error time Tune has written the pickled
    error next to the driver's copy of the trial (`pickled_error_file`), not yet to storage."""
    import ray.cloudpickle as pickle

    err = None
    try:
        path = trial.pickled_error_file
        if path:
            with open(path, "rb") as f:
                err = pickle.load(f)
        err = err or trial.get_pickled_error()
    except Exception:  # noqa: BLE001 - best effort: the message is only a tag
        err = None
    return error_line(err) if err is not None else "trial failed (see the Tune trial folder)"
