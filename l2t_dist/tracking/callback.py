"""The MLflow side of `l2t-dist train`: one MLflow run per training run, written by rank 0.

`start_tracking` is called by the CLI right after the job validates: it decides whether to
track (tracking.enabled, mlflow importable), resolves the URI and probes it, all before any
data or model is loaded. It returns an `MlflowCallback`, a LocalRun callback:

  on_start      create the MLflow run (or reopen the one in RUN_DIR/mlflow_run.json when
                resuming), log the flattened job as params and job.yaml; check that the
                registered-model name fits this model's signature (before any training step);
                after a resume, log the epochs of metrics.jsonl that MLflow has not seen
  on_epoch_end  per-epoch metrics at step=epoch, the λ heat-map every heatmap_every epochs
                and the learning curves
  on_end        best_val_acc and friends, the final heat-map, last.pt, the target model of
                best.pt (registered under tracking.registered_model with the champion rule)

The session owner (the CLI, or the Ray driver) ends the run with `end(status)`: FINISHED,
FAILED (a TrainingError, a NaN, a crash) or KILLED (Ctrl-C). With `--backend ray` the driver
creates the run (`for_workers`) and rank 0 rebuilds the callback from a plain dict.
The object holds plain data only (no client), so it pickles into a Ray worker.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

from l2t_dist.errors import ConfigError
from l2t_dist.tracking import runs
from l2t_dist.tracking.uri import check_tracking_uri, mlflow_available, resolve_tracking_uri

HEATMAP_DIR = "lambda_heatmaps"


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
        with contextlib.suppress(Exception):
            import torch

            tree = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["trainer"]["job"]
    section = (tree or {}).get("tracking") if isinstance(tree, dict) else None
    try:
        return TrackingConfig.model_validate(section or {}).model_dump(mode="json")
    except ValueError:
        return TrackingConfig().model_dump(mode="json")


class MlflowCallback:
    """A LocalRun callback that writes one MLflow run; see the module docstring."""

    def __init__(self, uri: str, cfg: dict, run_dir: Path, *, resume: bool = False,
                 run_id: Optional[str] = None, experiment_id: Optional[str] = None):
        self.uri, self.cfg, self.run_dir, self.resume = uri, dict(cfg), Path(run_dir), resume
        self.run_id, self.experiment_id = run_id, experiment_id
        self._opened = False        # the run is RUNNING in this process (or on the driver)
        self._epochs_here = 0       # epochs trained by this process
        self._warned = False

    # ---- the run ---------------------------------------------------------------------------------
    def _client(self):
        return runs.client(self.uri)

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
        """Close the run (FINISHED, FAILED or KILLED); a no-op when it was never started."""
        if not self._opened or not self.run_id:
            return
        self._opened = False
        self._client().set_terminated(self.run_id, status=status)

    # ---- LocalRun callbacks -------------------------------------------------------------------------
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
            self._backfill()

    def _backfill(self) -> None:
        """Epochs in metrics.jsonl that MLflow missed (a stop between checkpoint and logging)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        c = self._client()
        seen = runs.logged_steps(c, self.run_id)
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("epoch") not in seen:
                    runs.log_metrics(c, self.run_id, runs.epoch_metrics(record), step=record["epoch"])

    def on_epoch_end(self, run, record: dict) -> None:
        if not getattr(run, "writer", True):
            return
        self._epochs_here += 1
        try:
            c = self._client()
            runs.log_metrics(c, self.run_id, runs.epoch_metrics(record), step=record["epoch"])
            every = int(self.cfg.get("heatmap_every") or 0)
            if every and record["epoch"] % every == 0:
                name = f"{HEATMAP_DIR}/lambda_epoch_{record['epoch']:04d}.png"
                self._figures(c, run, record.get("pairs") or {}, name, f"{run.job.run.name}, epoch {record['epoch']}")
        except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not kill a long training run
            self._warn(f"MLflow logging of epoch {record.get('epoch')} failed ({exc}); training goes on")

    def _figures(self, c, run, pairs: dict, heatmap_name: str, title: str) -> None:
        from l2t_dist.tracking.plots import lambda_heatmap, learning_curves

        with tempfile.TemporaryDirectory(prefix="l2t-mlflow-") as tmp:
            folder, _, filename = heatmap_name.rpartition("/")
            if pairs and lambda_heatmap(pairs, Path(tmp) / filename, f"{title}: mean λ per pair"):
                c.log_artifact(self.run_id, str(Path(tmp) / filename), folder or None)
            if learning_curves(run.history, Path(tmp) / "learning_curves.png", run.job.run.name):
                c.log_artifact(self.run_id, str(Path(tmp) / "learning_curves.png"))

    def on_end(self, run, summary: dict) -> None:
        if not getattr(run, "writer", True):
            return
        c = self._client()
        final = {k: summary.get(k) for k in ("best_val_acc", "test_acc_at_best_val", "best_epoch")}
        runs.log_metrics(c, self.run_id, {k: float(v) for k, v in final.items() if v is not None},
                         step=int(summary.get("epochs") or 0))
        self._figures(c, run, summary.get("pairs") or {}, "lambda_heatmap.png", f"{run.job.run.name}, final")
        with tempfile.TemporaryDirectory(prefix="l2t-mlflow-") as tmp:
            (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            c.log_artifact(self.run_id, str(Path(tmp) / "summary.json"))
        if self.cfg.get("log_checkpoint", True) and (self.run_dir / "last.pt").is_file():
            c.log_artifact(self.run_id, str(self.run_dir / "last.pt"), "checkpoints")
        info = {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}
        info.update(self._log_model(c, summary))
        summary["mlflow"] = info

    def _log_model(self, c, summary: dict) -> dict:
        """The best-by-val target (best.pt), registered when tracking.registered_model is set."""
        tags = c.get_run(self.run_id).data.tags
        if self._epochs_here == 0 and "l2t.model_uri" in tags:  # a resume of a finished, logged run
            return {"model_uri": tags["l2t.model_uri"], "registered": None}
        ckpt = self.run_dir / "best.pt"
        if not ckpt.is_file():
            ckpt = self.run_dir / "last.pt"
        name = self.cfg.get("registered_model")
        if name:
            from l2t_dist.tracking.registry import register_checkpoint

            val = summary.get("best_val_acc")
            reg = register_checkpoint(self.run_id, ckpt, name, val_acc=float(val if val is not None else -1.0),
                                      tracking_uri=self.uri)
            c.set_tag(self.run_id, "l2t.model_uri", reg["model_uri"])
            return {"model_uri": reg["model_uri"], "registered": {"name": name, **reg}}
        from mlflow.exceptions import MlflowException

        from l2t_dist.tracking.registry import RegistryError, log_target_model

        try:
            logged, _ = log_target_model(self.run_id, ckpt, self.uri)
        except MlflowException as exc:
            raise RegistryError(f"logging the model of {str(ckpt)!r} to MLflow failed: {exc.message}") from None
        c.set_tag(self.run_id, "l2t.model_uri", logged.model_uri)
        return {"model_uri": logged.model_uri, "registered": None}

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
