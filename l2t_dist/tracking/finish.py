"""What one MLflow run of a training run holds, logged from the training loop or from RUN_DIR.

`log_epoch` is the per-epoch task (metrics, heat-map, learning curves). `backfill` sends the
epochs of RUN_DIR/metrics.jsonl that MLflow lacks (a resume, a server that came back).
`complete` is what on_end logs: final metrics, final figures, summary.json, last.pt, and the
model, registered with the champion rule. `l2t-dist models sync` calls backfill and complete
on a run whose server stopped answering. Each step looks at what MLflow has already, so a
second call sends nothing twice (a model logged before is not logged again).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from l2t_dist.tracking import runs

HEATMAP_DIR = "lambda_heatmaps"
MODEL_URI_TAG = "l2t.model_uri"
MODEL_EPOCHS_TAG = "l2t.model_epochs"  # the run's epoch count when its model was logged


@dataclass(frozen=True)
class RunRef:
    """Which MLflow run, where, for which run directory and tracking section."""

    uri: str
    run_id: str
    experiment_id: Optional[str]
    run_dir: Path
    cfg: dict

    @property
    def title(self) -> str:
        return self.run_dir.name


def heatmap_name(epoch: int) -> str:
    return f"{HEATMAP_DIR}/lambda_epoch_{epoch:04d}.png"


def _heatmap_due(cfg: dict, epoch: int) -> bool:
    every = int(cfg.get("heatmap_every") or 0)
    return bool(every) and epoch % every == 0


def log_figures(c, ref: RunRef, pairs: dict, history: Sequence[dict], heatmap: Optional[str], when: str) -> None:
    """The λ heat-map (as artifact `heatmap`, when there are pairs) and the learning curves."""
    from l2t_dist.tracking.plots import lambda_heatmap, learning_curves

    with tempfile.TemporaryDirectory(prefix="l2t-mlflow-") as tmp:
        if heatmap:
            folder, _, filename = heatmap.rpartition("/")
            if pairs and lambda_heatmap(pairs, Path(tmp) / filename, f"{ref.title}, {when}: mean λ per pair"):
                c.log_artifact(ref.run_id, str(Path(tmp) / filename), folder or None)
        if learning_curves(history, Path(tmp) / "learning_curves.png", ref.title):
            c.log_artifact(ref.run_id, str(Path(tmp) / "learning_curves.png"))


def log_epoch(c, ref: RunRef, record: dict, history: Sequence[dict], stamp: Optional[int] = None) -> None:
    """One epoch: its metrics at step=epoch (timestamp `stamp`, ms); the heat-map and the curves
    every heatmap_every epochs."""
    epoch = record["epoch"]
    runs.log_metrics(c, ref.run_id, runs.epoch_metrics(record), step=epoch, stamp=stamp)
    if _heatmap_due(ref.cfg, epoch):
        log_figures(c, ref, record.get("pairs") or {}, history, heatmap_name(epoch), f"epoch {epoch}")


def backfill(c, ref: RunRef, stamps: Optional[dict] = None) -> int:
    """Send the epochs of metrics.jsonl that MLflow has no train_loss for, with their heat-maps
    when due; returns how many epochs were sent. `stamps`: epoch -> the timestamp its metrics
    were sent with before (runs.log_steps)."""
    records = runs.epoch_records(ref.run_dir)
    seen = runs.logged_steps(c, ref.run_id)
    missing = [r for r in records if r["epoch"] not in seen]
    if not missing:
        return 0
    runs.log_steps(c, ref.run_id, {r["epoch"]: runs.epoch_metrics(r) for r in missing}, stamps)
    due = [r for r in missing if _heatmap_due(ref.cfg, r["epoch"]) and r.get("pairs")]
    if due:
        have = {a.path for a in c.list_artifacts(ref.run_id, HEATMAP_DIR)}
        for r in due:
            if heatmap_name(r["epoch"]) not in have:
                log_figures(c, ref, r["pairs"], (), heatmap_name(r["epoch"]), f"epoch {r['epoch']}")
    if _heatmap_due(ref.cfg, missing[-1]["epoch"]):
        log_figures(c, ref, {}, history_of(records), None, "")
    return len(missing)


def history_of(records: Sequence[dict]) -> list[dict]:
    """The loop's history (records without their pairs) from metrics.jsonl."""
    return [{k: v for k, v in r.items() if k != "pairs"} for r in records]


def complete(c, ref: RunRef, summary, history: Sequence[dict], epochs_here: int,
             stamps: Optional[dict] = None) -> dict:
    """What on_end logs, after any missing epoch; returns summary.mlflow's model part
    {"model_uri", "registered"}."""
    backfill(c, ref, stamps)
    final = {k: getattr(summary, k) for k in ("best_val_acc", "test_acc_at_best_val", "best_epoch")}
    runs.log_metrics(c, ref.run_id, {k: float(v) for k, v in final.items() if v is not None},
                     step=int(summary.epochs or 0))
    log_figures(c, ref, summary.pairs or {}, history, "lambda_heatmap.png", "final")
    with tempfile.TemporaryDirectory(prefix="l2t-mlflow-") as tmp:
        (Path(tmp) / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1, default=str))
        c.log_artifact(ref.run_id, str(Path(tmp) / "summary.json"))
    if ref.cfg.get("log_checkpoint", True) and (ref.run_dir / "last.pt").is_file():
        c.log_artifact(ref.run_id, str(ref.run_dir / "last.pt"), "checkpoints")
    return _log_model(c, ref, summary, epochs_here)


def _model_is_logged(tags: dict, summary, epochs_here: int) -> bool:
    if MODEL_URI_TAG not in tags:
        return False
    if MODEL_EPOCHS_TAG in tags:
        return tags[MODEL_EPOCHS_TAG] == str(summary.epochs)
    return epochs_here == 0  # a run logged before that tag existed: a resume that trained nothing


def _log_model(c, ref: RunRef, summary, epochs_here: int) -> dict:
    """The best-by-val target (best.pt), registered when tracking.registered_model is set."""
    from mlflow.entities import RunTag

    tags = c.get_run(ref.run_id).data.tags
    if _model_is_logged(tags, summary, epochs_here):
        return {"model_uri": tags[MODEL_URI_TAG], "registered": None}
    ckpt = ref.run_dir / "best.pt"
    if not ckpt.is_file():
        ckpt = ref.run_dir / "last.pt"
    name = ref.cfg.get("registered_model")
    registered = None
    if name:
        from l2t_dist.tracking.registry import register_checkpoint

        val = summary.best_val_acc
        reg = register_checkpoint(ref.run_id, ckpt, name, val_acc=float(val if val is not None else -1.0),
                                  tracking_uri=ref.uri)
        model_uri, registered = reg["model_uri"], {"name": name, **reg}
    else:
        from mlflow.exceptions import MlflowException

        from l2t_dist.tracking.registry import RegistryError, log_target_model

        try:
            model_uri = log_target_model(ref.run_id, ckpt, ref.uri)[0].model_uri
        except MlflowException as exc:
            raise RegistryError(f"logging the model of {str(ckpt)!r} to MLflow failed: {exc.message}") from None
    c.log_batch(ref.run_id, tags=[RunTag(MODEL_URI_TAG, model_uri), RunTag(MODEL_EPOCHS_TAG, str(summary.epochs))])
    return {"model_uri": model_uri, "registered": registered}
