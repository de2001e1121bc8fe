"""The MLflow side of `l2t-dist train`: one MLflow run per training run, written by rank 0.

`start_tracking` is called by the CLI right after the job validates: it decides whether to
track (tracking.enabled, mlflow importable), resolves the URI and probes it, all before any
data or model is loaded. It returns an `MlflowCallback`, a training-loop callback:

  on_start      create the MLflow run (or reopen the one in RUN_DIR/mlflow_run.json when
                resuming), log the flattened job as params and job.yaml; check that the
                registered-model name fits this model's signature (before any training step);
                after a resume, log the epochs of metrics.jsonl that MLflow has not seen;
                start the system-metrics monitor
  on_epoch_end  hand the epoch to a background sender (tracking/sender.py): metrics at
                step=epoch, the λ heat-map every heatmap_every epochs and the learning curves
  on_end        tracking/finish.py `complete`: best_val_acc and friends, the final heat-map,
                last.pt, the target model of best.pt (registered under
                tracking.registered_model with the champion rule)

Training never waits for a server that stopped answering (tracking/breaker.py): the sender
drops what it cannot send (metrics.jsonl has every epoch) and back-fills it when the server
answers again. If it still does not answer at the end, RUN_DIR/mlflow_pending.json keeps the
summary and `l2t-dist models sync RUN_DIR` completes the run later (tracking/sync.py).

The session owner (the CLI, or the Ray driver) ends the run with `end(status)`: FINISHED,
FAILED (a TrainingError, a NaN, a crash) or KILLED (Ctrl-C). With `--backend ray` the driver
creates the run (`for_workers`) and rank 0 rebuilds the callback from a plain dict.
The object holds plain data only until on_start (no client, no thread), so it pickles into a
Ray worker.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from l2t_dist.errors import ConfigError, L2TError
from l2t_dist.tracking import runs
from l2t_dist.tracking.finish import RunRef
from l2t_dist.tracking.uri import check_tracking_uri, mlflow_available, resolve_tracking_uri, server_down

DRAIN_S = 60.0  # on_end waits this long at most for the epochs still being sent


def start_tracking(job, resume: Optional[str] = None) -> Optional["MlflowCallback"]:
    """The tracker of this `train` call, or None when tracking is off. Fails fast (ConfigError)
    when tracking.enabled=true without mlflow, or when the store cannot be reached."""
    prior = runs.read_run_file(Path(resume)) if resume else None
    if prior is not None and isinstance(prior.get("tracking"), dict):
        cfg = prior["tracking"]
    elif resume:
        cfg = _tracking_of_run_dir(Path(resume))
    else:
        cfg = job.tracking.model_dump(mode="json")
    enabled = cfg.get("enabled")
    if enabled is False:
        return None
    if not mlflow_available():
        if enabled:
            raise ConfigError("tracking.enabled=true but mlflow is not installed; install it with "
                              "`pip install mlflow==3.17.2`, or set tracking.enabled=false (or leave it unset "
                              "to track only where mlflow is installed)")
        return None
    uri = prior["tracking_uri"] if prior else resolve_tracking_uri(cfg)
    check_tracking_uri(uri)
    run_dir = Path(resume) if resume else Path(job.run.out_dir) / job.run.name
    return MlflowCallback(uri, cfg, run_dir, resume=bool(resume), run_id=(prior or {}).get("run_id"),
                          experiment_id=(prior or {}).get("experiment_id"))


def _tracking_of_run_dir(run_dir: Path) -> dict:
    """The tracking section of a run started without a tracker (job.yaml, else last.pt)."""
    import yaml

    from l2t_dist.config import TrackingConfig

    tree = None
    with contextlib.suppress(OSError, yaml.YAMLError):
        tree = yaml.safe_load((run_dir / "job.yaml").read_text())
    if not isinstance(tree, dict) and (run_dir / "last.pt").is_file():
        from l2t_dist.errors import CheckpointError
        from l2t_dist.train.state import TrainingState

        with contextlib.suppress(CheckpointError):
            tree = TrainingState.load(run_dir / "last.pt").job
    section = (tree or {}).get("tracking") if isinstance(tree, dict) else None
    try:
        return TrackingConfig.model_validate(section or {}).model_dump(mode="json")
    except ValueError:
        return TrackingConfig().model_dump(mode="json")


@dataclass
class _Live:
    """What a writing process runs while it trains (never pickled)."""

    breaker: Any
    sender: Any
    monitor: Any


class MlflowCallback:
    """A training-loop callback that writes one MLflow run; see the module docstring."""

    def __init__(self, uri: str, cfg: dict, run_dir: Path, *, resume: bool = False,
                 run_id: Optional[str] = None, experiment_id: Optional[str] = None):
        self.uri, self.cfg, self.run_dir, self.resume = uri, dict(cfg), Path(run_dir), resume
        self.run_id, self.experiment_id = run_id, experiment_id
        self._opened = False        # the run is RUNNING in this process (or on the driver)
        self._epochs_here = 0       # epochs trained by this process
        self._warned = False
        self._live: Optional[_Live] = None
        self._stamps: dict[int, int] = {}  # epoch -> ms timestamp its metrics were first sent with

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_live": None}

    # ---- the run ---------------------------------------------------------------------------------
    def _client(self):
        return runs.client(self.uri)

    def _ref(self) -> RunRef:
        return RunRef(self.uri, self.run_id, self.experiment_id, self.run_dir, self.cfg)

    def ensure_run(self, job) -> str:
        """Create the MLflow run, or reopen the run of mlflow_run.json when resuming."""
        if self._opened:
            return self.run_id
        from mlflow.exceptions import MlflowException

        from l2t_dist.config import flatten

        try:
            c = self._client()
            if self.resume and self.run_id:
                c.update_run(self.run_id, status="RUNNING")
            else:
                self.experiment_id = runs.experiment_id(self.uri, self.cfg["experiment"])
                run = c.create_run(self.experiment_id, run_name=job.run.name, tags={
                    "l2t.run_dir": str(self.run_dir.resolve()), "l2t.method": job.method.name,
                    "l2t.target_arch": job.target.arch, "l2t.sources": ",".join(s.name for s in job.sources)})
                self.run_id = run.info.run_id
                runs.log_params(c, self.run_id, flatten(job))
                if (self.run_dir / "job.yaml").is_file():
                    c.log_artifact(self.run_id, str(self.run_dir / "job.yaml"))
        except MlflowException as exc:
            raise ConfigError(f"MLflow at {self.uri!r} refused to start the run: {exc.message}; check the "
                              "server, or set tracking.enabled=false to train without tracking") from None
        runs.write_run_file(self.run_dir, {"run_id": self.run_id, "experiment_id": self.experiment_id,
                                           "tracking_uri": self.uri, "experiment": self.cfg["experiment"],
                                           "tracking": self.cfg})
        self._opened = True
        return self.run_id

    def for_workers(self, job, run_dir: Path) -> dict:
        """Ray driver: open the run here, hand rank 0 what it needs to rebuild this callback."""
        self.run_dir = Path(run_dir)
        self.ensure_run(job)
        return {"uri": self.uri, "cfg": self.cfg, "run_dir": str(self.run_dir), "resume": self.resume,
                "run_id": self.run_id, "experiment_id": self.experiment_id}

    @classmethod
    def from_config(cls, data: dict) -> "MlflowCallback":
        cb = cls(data["uri"], data["cfg"], Path(data["run_dir"]), resume=data["resume"], run_id=data["run_id"],
                 experiment_id=data["experiment_id"])
        cb._opened = True  # the driver opened it and ends it
        return cb

    def end(self, status: str = "FINISHED") -> None:
        """Close the run (FINISHED, FAILED or KILLED); a no-op when it was never started. A run
        the server missed part of stays for `l2t-dist models sync` (which sets the status)."""
        if not self._opened or not self.run_id:
            return
        self._opened = False
        self._stop_live()
        if runs.read_pending(self.run_dir) is None:
            try:
                c = self._client()
                with contextlib.suppress(Exception):  # a failed run: the epochs that did not get through
                    from l2t_dist.tracking.finish import backfill

                    backfill(c, self._ref(), self._stamps)
                c.set_terminated(self.run_id, status=status)
                return
            except Exception:
                if server_down(self.uri) is None:
                    raise
        runs.mark_pending(self.run_dir, status=status)
        print(f"warning: MLflow run {self.run_id} at {self.uri} is incomplete (the server did not answer); once it "
              f"answers, complete it with `l2t-dist models sync {self.run_dir}`", file=sys.stderr, flush=True)

    # ---- training-loop callbacks -------------------------------------------------------------------------
    def on_start(self, run) -> None:
        if not getattr(run, "writer", True):
            return
        self.run_dir = Path(run.run_dir)
        self.ensure_run(run.job)
        name = self.cfg.get("registered_model")
        if name:  # before the first step: a wrong name costs seconds, not a training run
            from l2t_dist.tracking.registry import check_signature

            check_signature(self.uri, name, run.job.data.image_size, run.data.num_classes)
        if self.resume:
            from l2t_dist.tracking.finish import backfill

            backfill(self._client(), self._ref())  # epochs MLflow missed (a stop between checkpoint and logging)
        self._start_live()

    def _start_live(self) -> None:
        from l2t_dist.tracking import sysmetrics
        from l2t_dist.tracking.breaker import Breaker
        from l2t_dist.tracking.sender import Sender

        breaker = Breaker(self.uri, on_open=self._outage)
        sender = Sender(breaker, self._client, self._recover, self._failed)
        monitor = None
        try:
            monitor = sysmetrics.start(self.uri, self.run_id, breaker, resume=self.resume)
            gpus = monitor.gpus if monitor is not None else None
            self._client().set_tag(self.run_id, "l2t.system_metrics_node",
                                   f"{socket.gethostname()} ({gpus or 'no'} GPU{'' if gpus == 1 else 's'})")
        except Exception as exc:  # noqa: BLE001 - the run goes on without them
            self._warn(f"MLflow system metrics could not start ({exc}); training goes on")
        self._live = _Live(breaker, sender, monitor)

    def _stop_live(self) -> None:
        live, self._live = self._live, None
        if live is None:
            return
        if live.monitor is not None:
            live.monitor.stop()
        live.sender.drain(DRAIN_S)
        live.sender.close(1.0)

    def on_epoch_end(self, run, record: dict) -> None:
        if not getattr(run, "writer", True):
            return
        self._epochs_here += 1
        if self._live is None:  # a loop that skipped on_start: nothing to send with
            return
        from l2t_dist.tracking.finish import log_epoch

        ref, record, history = self._ref(), dict(record), list(run.history)
        stamp = self._stamps[record["epoch"]] = int(time.time() * 1000)
        self._live.sender.submit(lambda c: log_epoch(c, ref, record, history, stamp), f"epoch {record['epoch']}")

    def on_end(self, run, summary) -> None:
        if not getattr(run, "writer", True):
            return
        from l2t_dist.tracking.finish import complete
        from l2t_dist.tracking.registry import RegistryError

        live = self._live
        self._stop_live()  # the last epochs sent, the system metrics' last point logged
        info = {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}
        if live is not None and not live.breaker.allows(probe_now=True):
            return self._defer(summary, info)
        try:
            c = self._client()
            if live is not None and live.breaker.pop_recovered():
                self._recover(c)
            info.update(complete(c, self._ref(), summary, run.history, self._epochs_here, self._stamps))
        except Exception as exc:
            if server_down(self.uri) is not None:
                return self._defer(summary, info)
            if isinstance(exc, L2TError):
                raise
            raise RegistryError(f"MLflow at {self.uri} failed to complete run {self.run_id}: {exc}") from None
        runs.clear_pending(self.run_dir)
        summary.mlflow = info

    def _defer(self, summary, info: dict) -> None:
        """The server does not answer at the end: keep what on_end would log for `models sync`."""
        runs.mark_pending(self.run_dir, summary=summary.to_dict(), epochs_here=self._epochs_here)
        summary.mlflow = {**info, "pending": True, "sync": f"l2t-dist models sync {self.run_dir}"}

    # ---- the sender's reports (its own thread) -------------------------------------------------------------
    def _outage(self, reason: str) -> None:
        from l2t_dist.tracking.breaker import retry_seconds

        print(f"warning: the MLflow server at {self.uri} does not answer ({reason}); training goes on without it: "
              f"every epoch stays in {self.run_dir}/metrics.jsonl and is sent when the server answers again "
              f"(checked every {retry_seconds():.0f} s), or later by `l2t-dist models sync {self.run_dir}`",
              file=sys.stderr, flush=True)

    def _recover(self, c) -> None:
        from l2t_dist.tracking.finish import backfill

        sent = backfill(c, self._ref(), self._stamps)
        print(f"note: the MLflow server at {self.uri} answers again; sent the {sent} epoch(s) it missed",
              file=sys.stderr, flush=True)

    def _failed(self, what: str, exc: BaseException) -> None:
        self._warn(f"MLflow logging of {what} failed ({exc}); training goes on")

    def _warn(self, message: str) -> None:
        if not self._warned:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        self._warned = True


def close(tracker: Optional[MlflowCallback], error: Optional[BaseException]) -> None:
    """End the run with the status that says what happened; never hides the training's own error."""
    if tracker is None:
        return
    status = "FINISHED" if error is None else ("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
    try:
        tracker.end(status)
    except Exception as exc:  # noqa: BLE001
        if error is None:
            from l2t_dist.tracking.registry import RegistryError

            raise RegistryError(f"could not close MLflow run {tracker.run_id} at {tracker.uri}: {exc}") from None
        print(f"warning: could not mark MLflow run {tracker.run_id} {status}: {exc}", file=sys.stderr)
