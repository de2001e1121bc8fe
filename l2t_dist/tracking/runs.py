"""Small MlflowClient helpers shared by the training callback, the registry and the CLI.

Everything goes through an explicit `MlflowClient(tracking_uri=...)`, never mlflow's global
"active run": a process may train, register and answer `models` calls against different
stores (tests do), and Ray workers have no fluent state to rely on.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from l2t_dist.tracking.uri import default_artifact_location

RUN_FILE = "mlflow_run.json"  # in RUN_DIR: the MLflow run that a --resume continues
PENDING_FILE = "mlflow_pending.json"  # in RUN_DIR while the MLflow run lacks what the server missed
MAX_PARAM_VALUE = 6000        # MLflow's limit on a param value (MAX_PARAM_VAL_LENGTH)
MAX_KEY = 250                 # MLflow's limit on a param or metric key
BATCH = 100                   # params per log_batch call (MLflow's limit)
METRIC_BATCH = 1000


def client(uri: str):
    """A client of `uri` with bounded HTTP calls; a sqlite store is created or upgraded first,
    under its file lock (tracking/store.py)."""
    from mlflow.tracking import MlflowClient

    from l2t_dist.tracking.breaker import bound_http_calls
    from l2t_dist.tracking.store import prepare_store

    bound_http_calls()
    prepare_store(uri)
    return MlflowClient(tracking_uri=uri)  # the registry follows (or $MLFLOW_REGISTRY_URI)


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id, created when missing (embedded sqlite: artifacts beside the database)."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=default_artifact_location(uri, name))
    except MlflowException:  # created meanwhile by a concurrent run
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def metric_name(name: str) -> str:
    """A pair name like `s:layer1.2->layer3.0` as an MLflow metric key (letters, digits, _ - . / space)."""
    name = name.replace("->", "-to-").replace(":", ".")
    name = re.sub(r"[^\w.\- /]", "_", name)
    name = re.sub(r"/+", "/", name).strip("/") or "_"
    return name[:MAX_KEY]


def param_items(params: dict[str, Any]):
    from mlflow.entities import Param

    out = []
    for k, v in params.items():
        text = "None" if v is None else str(v)
        if len(text) > MAX_PARAM_VALUE:
            text = text[:MAX_PARAM_VALUE - 15] + "...(truncated)"
        out.append(Param(str(k)[:MAX_KEY], text))
    return out


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    items = param_items(params)
    for i in range(0, len(items), BATCH):
        c.log_batch(run_id, params=items[i:i + BATCH])


def epoch_metrics(record: dict) -> dict[str, float]:
    """One epoch record of the training loop as flat MLflow metrics (None values skipped)."""
    out = {}
    for key in ("train_loss", "train_acc", "val_acc", "test_acc", "images_per_s", "lr"):
        value = record.get(key)
        if value is not None:
            out[key] = float(value)
    for pair, values in (record.get("pairs") or {}).items():
        for key in ("lambda", "entropy"):
            if values.get(key) is not None:
                out[f"{key}/{metric_name(pair)}"] = float(values[key])
    return out


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int, stamp: Optional[int] = None) -> None:
    log_steps(c, run_id, {int(step): metrics}, None if stamp is None else {int(step): stamp})


def log_steps(c, run_id: str, by_step: dict[int, dict[str, float]], stamps: Optional[dict] = None) -> None:
    """Metrics of several steps in as few log_batch calls as MLflow allows (a back-fill).
    `stamps`: the timestamp (ms) of a step, when it was sent before: MLflow drops a metric equal
    in key, value, step and timestamp, so a timed-out call that reached the server after all
    leaves no duplicate."""
    from mlflow.entities import Metric

    now, stamps = int(time.time() * 1000), stamps or {}
    items = [Metric(k, v if math.isfinite(v) else float("nan"), int(stamps.get(step, now)), int(step))
             for step, metrics in by_step.items() for k, v in metrics.items()]
    for i in range(0, len(items), METRIC_BATCH):
        c.log_batch(run_id, metrics=items[i:i + METRIC_BATCH])


def logged_steps(c, run_id: str, key: str = "train_loss") -> set[int]:
    return {m.step for m in c.get_metric_history(run_id, key)}


def epoch_records(run_dir: Path) -> list[dict]:
    """The epoch records of RUN_DIR/metrics.jsonl (every epoch, whatever reached MLflow)."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                out.append(record)
    return out


def read_run_file(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("run_id") else None


def write_run_file(run_dir: Path, data: dict) -> None:
    _write_json(Path(run_dir) / RUN_FILE, data)


def read_pending(run_dir: Path) -> Optional[dict]:
    """What the MLflow run still lacks ({"summary": ..., "status": ...}), or None when complete."""
    path = Path(run_dir) / PENDING_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def mark_pending(run_dir: Path, **fields) -> None:
    """Record (merge) what could not be sent, for the next on_end, a resume or `models sync`."""
    _write_json(Path(run_dir) / PENDING_FILE, {**(read_pending(run_dir) or {}), **fields})


def clear_pending(run_dir: Path) -> None:
    (Path(run_dir) / PENDING_FILE).unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
