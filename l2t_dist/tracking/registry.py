"""The model registry: log a trained target from its checkpoint, register it, move `champion`.

Contract (used by `l2t-dist train` and by `l2t-dist tune`):

    register_checkpoint(run_id, checkpoint, name, val_acc, tracking_uri=None) -> dict
        {"version": int, "champion": bool, "previous_champion": {...} | None, "model_uri": str,
         "decision": str}

The champion rule: the alias `champion` holds the version with the highest val accuracy, the
earliest one on a tie (registering one by one: it moves only when a new version is strictly
better). Runs that register at the same moment agree on it too (`settle_champion`). The
comparison is kept as tags on the new version (val_acc, champion_decision,
previous_champion_version, previous_champion_val_acc), so the registry explains itself.

The logged model is the plain target network (torch.export "pt2" format, MLflow's default,
which `mlflow.pytorch.load_model` reads without pickle): input float32 (B, 3, H, W) images
normalised with the ImageNet mean and std (`l2t_dist.data.normalize`), output (B, classes)
logits. The input example has a batch of 2, so the batch dimension stays dynamic.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Optional

from l2t_dist.errors import CheckpointError, ConfigError, L2TError

CHAMPION = "champion"
MODEL_NAME = "model"          # artifact name of the logged model inside the run
EXAMPLE_BATCH = 2
INPUT_NOTE = "float32 (B, 3, H, W) images normalised with ImageNet mean/std; output (B, classes) logits"


class RegistryError(L2TError):
    """The registry or the store failed at run time (not a bad input)."""

    exit_code = 3


# ---- the model and its signature -------------------------------------------------------------

def model_signature(image_size: int, num_classes: int):
    """What every l2t-dist model of this shape is registered with (also checked before training)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype("float32"), (-1, 3, image_size, image_size))]),
                          outputs=Schema([TensorSpec(np.dtype("float32"), (-1, num_classes))]))


def describe_signature(signature) -> str:
    if signature is None:
        return "no signature"

    def side(schema) -> str:
        if schema is None:
            return "?"
        specs = []
        for spec in schema.to_dict():
            t = spec.get("tensor-spec")
            specs.append(f"{t['dtype']} {tuple(t['shape'])}" if t else f"{spec.get('name', '')}:{spec.get('type')}")
        return ", ".join(specs)

    return f"input {side(signature.inputs)} -> output {side(signature.outputs)}"


def _same(a, b) -> bool:
    def norm(sig):
        return json.dumps([sig.inputs.to_dict() if sig.inputs else None,
                           sig.outputs.to_dict() if sig.outputs else None], sort_keys=True, default=str)
    return norm(a) == norm(b)


def load_checkpoint_model(checkpoint):
    """(target model in eval mode, {arch, num_classes, image_size}) from an l2t-dist checkpoint."""
    from l2t_dist.models import build_model
    from l2t_dist.sources.zoo import FORMAT, load_state_strict
    from l2t_dist.train.state import TrainingState, read_checkpoint

    path = Path(checkpoint)
    obj = read_checkpoint(path, "a training run writes best.pt and last.pt into its run directory")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not obj.get("arch"):
        raise CheckpointError(f"{str(path)!r} is not an l2t-dist checkpoint (format {FORMAT!r} with arch, "
                              "num_classes and state_dict); register the best.pt of a training run")
    job = TrainingState.from_checkpoint(obj, str(path)).job if "trainer" in obj else {}
    image_size = int((job.get("data") or {}).get("image_size") or 32)
    model = build_model(obj["arch"], int(obj["num_classes"]))
    load_state_strict(model, obj["state_dict"])
    step = obj["trainer"].get("global_step") if isinstance(obj.get("trainer"), dict) else None
    return model.eval(), {"arch": obj["arch"], "num_classes": int(obj["num_classes"]), "image_size": image_size,
                          "global_step": step}


# ---- registry look-ups -----------------------------------------------------------------------

def _is_missing(exc) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def registered_versions(c, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException as exc:
        if _is_missing(exc):
            return []
        raise
    return sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def champion_version(c, name: str):
    """The version that holds the alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if _is_missing(exc):
            return None
        raise


def version_val_acc(c, version) -> Optional[float]:
    """The val accuracy a version was registered with (its tag, else its run's best_val_acc)."""
    tag = (version.tags or {}).get("val_acc")
    if tag not in (None, "", "None"):
        try:
            return float(tag)
        except ValueError:
            pass
    if version.run_id:
        with contextlib.suppress(Exception):
            value = c.get_run(version.run_id).data.metrics.get("best_val_acc")
            return None if value is None else float(value)
    return None


def registered_signature(uri: str, name: str, version: str):
    import mlflow.models

    with use_tracking_uri(uri):
        return mlflow.models.get_model_info(f"models:/{name}/{version}").signature


def check_signature(uri: str, name: str, image_size: int, num_classes: int) -> None:
    """ConfigError when `name` is registered with another input shape or number of classes.
    Cheap (reads one MLmodel file), so it runs before training."""
    c = _client(uri)
    versions = registered_versions(c, name)
    if not versions:
        return
    latest = versions[-1]
    try:
        existing = registered_signature(uri, name, latest.version)
    except Exception:  # noqa: BLE001 - a version we cannot read says nothing about the shape
        return
    wanted = model_signature(image_size, num_classes)
    if existing is not None and not _same(existing, wanted):
        raise ConfigError(
            f"registered model {name!r} (version {latest.version}) has signature {describe_signature(existing)}, "
            f"but this job produces {describe_signature(wanted)}; versions of one registered model must share "
            f"a signature: choose another name with tracking.registered_model=NEW_NAME")


@contextlib.contextmanager
def use_tracking_uri(uri: str):
    """mlflow.pytorch.log_model and get_model_info read the global URI: set it for the call only."""
    import mlflow

    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # pragma: no cover - other mlflow versions
        mlflow.set_tracking_uri(uri)
        yield
        return
    with _use_tracking_uri(uri):
        yield


def _client(uri: str):
    from l2t_dist.tracking.runs import client

    return client(uri)


# ---- logging and registering -----------------------------------------------------------------

def _requirements() -> list[str]:
    """Given explicitly: MLflow would otherwise infer them by loading the model in a subprocess."""
    import mlflow
    import numpy
    import torch

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={numpy.__version__}"]


def log_target_model(run_id: str, checkpoint, tracking_uri: str, loaded=None):
    """Log the checkpoint's target network to the run; returns (ModelInfo, shape info).
    `loaded`: load_checkpoint_model's result, when the caller has it already."""
    import mlflow.pytorch
    import torch

    model, info = loaded or load_checkpoint_model(checkpoint)
    g = torch.Generator().manual_seed(0)
    example = torch.rand(EXAMPLE_BATCH, 3, info["image_size"], info["image_size"], generator=g)
    signature = model_signature(info["image_size"], info["num_classes"])
    c = _client(tracking_uri)
    # Created here, in the run's experiment: log_model alone files it under the process's
    # active experiment (Default), whose artifacts would land in ./mlruns of the working directory.
    model_id = c.create_logged_model(experiment_id=c.get_run(run_id).info.experiment_id, name=MODEL_NAME,
                                     source_run_id=run_id, model_type="l2t-dist target").model_id
    with use_tracking_uri(tracking_uri):
        logged = mlflow.pytorch.log_model(model, name=MODEL_NAME, run_id=run_id, model_id=model_id,
                                          signature=signature,
                                          input_example=example.numpy(), pip_requirements=_requirements(),
                                          metadata={"l2t_dist": {**info, "input": INPUT_NOTE}})
    return logged, info


def register_checkpoint(run_id: str, checkpoint, name: str, val_acc: float,
                        tracking_uri: Optional[str] = None) -> dict:
    """Log the target model of `checkpoint` (an l2t-dist best.pt) to MLflow run `run_id`, register
    it as a new version of `name`, and move `champion` to the best version by val accuracy.

    Returns {"version": int, "champion": bool, "previous_champion": {"version", "val_acc", "run_id"}
    or None, "model_uri": "models:/NAME/VERSION", "decision": the champion_decision tag}. A
    version that this run already registered from this very checkpoint (a `models sync` after a
    crash in between) is reused, not doubled.
    ConfigError when `name` holds models of another signature; CheckpointError for an unreadable
    checkpoint; RegistryError when MLflow fails."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from l2t_dist.tracking.store import registry_lock
    from l2t_dist.tracking.uri import resolve_tracking_uri

    uri = tracking_uri or resolve_tracking_uri(None)
    val_acc = float(val_acc)
    c = _client(uri)
    try:
        loaded = load_checkpoint_model(checkpoint)  # a bad checkpoint fails before anything is logged
        info = loaded[1]
        check_signature(uri, name, info["image_size"], info["num_classes"])
        tags = {"val_acc": repr(val_acc), "checkpoint": str(Path(checkpoint).resolve()), "l2t_run_id": run_id,
                "checkpoint_step": str(info["global_step"]), "arch": info["arch"],
                "num_classes": str(info["num_classes"]), "image_size": str(info["image_size"]), "input": INPUT_NOTE}
        mv = _registered_before(c, name, run_id, tags["checkpoint_step"])
        logged = log_target_model(run_id, checkpoint, uri, loaded)[0] if mv is None else None
        with registry_lock(uri), use_tracking_uri(uri):
            if mv is None:  # again under the lock: another run may have registered a first version meanwhile
                check_signature(uri, name, info["image_size"], info["num_classes"])
                # the tags come with the version, so concurrent registrations see its val accuracy
                mv = mlflow.register_model(logged.model_uri, name, await_registration_for=60, tags=tags)
            result = settle_champion(c, name, int(mv.version), val_acc)
    except MlflowException as exc:
        raise RegistryError(f"registering {str(checkpoint)!r} as {name!r} in {uri} failed: {exc.message}") from None
    with contextlib.suppress(Exception):  # the run shows where its model went
        c.set_tag(run_id, "registered_model", name)
        c.set_tag(run_id, "registered_version", str(result["version"]))
        c.set_tag(run_id, "champion_decision", result["decision"])
    return result


def _registered_before(c, name: str, run_id: str, step: str):
    """The version this run registered from the checkpoint of `step`, if any."""
    if step in ("", "None"):
        return None
    found = [v for v in registered_versions(c, name)
             if v.run_id == run_id and (v.tags or {}).get("checkpoint_step") == step]
    return found[0] if found else None


# ---- the champion rule, safe with concurrent registrations ------------------------------------

SETTLE_TRIES = 20


def champion_target(c, versions: list, current):
    """The version that should hold `champion`: the highest val accuracy, the earliest version on
    a tie (what registering one by one with "strictly higher moves it" gives). A current
    champion whose val accuracy is unknown stays: nothing can be shown to beat it."""
    vals = {str(v.version): version_val_acc(c, v) for v in versions}
    if current is not None and str(current.version) in vals and vals[str(current.version)] is None:
        return current
    known = [v for v in versions if vals[str(v.version)] is not None]
    if not known:
        return current if current is not None else (versions[0] if versions else None)
    return max(known, key=lambda v: (vals[str(v.version)], -int(v.version)))


def settle_champion(c, name: str, version: int, val_acc: float) -> dict:
    """Move `champion` to `champion_target`, then read again until a read agrees with the alias.

    Every registration ends with such a read, after its own version exists; the last of those
    reads sees every version, and no move follows it (each move is followed by its mover's
    read). So the alias ends on the best version whatever the order of concurrent registrations
    on a server; on sqlite, registry_lock makes the first read the last. The version's decision
    tags describe what this registration saw."""
    from mlflow.exceptions import MlflowException

    previous, current, refused = None, None, None
    for attempt in range(SETTLE_TRIES):
        versions = registered_versions(c, name)
        current = champion_version(c, name)
        if attempt == 0 and current is not None and int(current.version) != version:
            previous = {"version": int(current.version), "val_acc": version_val_acc(c, current),
                        "run_id": current.run_id}
        target = champion_target(c, versions, current)
        if target is not None and current is not None and str(current.version) == str(target.version):
            break
        if target is not None:
            try:
                c.set_registered_model_alias(name, CHAMPION, str(target.version))
                refused = None
            except MlflowException as exc:  # a server that set the alias for someone else meanwhile
                refused = exc               # ("UNIQUE constraint failed"): read again
        if attempt or refused is not None:
            time.sleep(random.uniform(0.05, 0.3))  # others are moving it too: let them finish
    else:
        if refused is not None:
            raise refused
        print(f"warning: the {CHAMPION} alias of {name!r} still moved after {SETTLE_TRIES} checks; see "
              f"`l2t-dist models show {name}`", file=sys.stderr, flush=True)
    holder = int(current.version) if current is not None else None
    promote = holder == version
    decision = _decision(name, val_acc, previous, promote, holder, current and version_val_acc(c, current))
    for key, value in {"champion_decision": decision,
                       "previous_champion_version": str(previous["version"]) if previous else "",
                       "previous_champion_val_acc": repr(previous["val_acc"]) if previous else ""}.items():
        c.set_model_version_tag(name, str(version), key, value)
    return {"version": version, "champion": promote, "previous_champion": previous,
            "model_uri": f"models:/{name}/{version}", "decision": decision}


def _decision(name: str, val_acc: float, previous: Optional[dict], promote: bool, holder: Optional[int],
              holder_val: Optional[float]) -> str:
    if promote:
        if previous is None:
            return f"champion: first version of {name!r} with val_acc {val_acc:.4f}"
        if previous["val_acc"] is None:
            return f"champion: val_acc {val_acc:.4f}, version {previous['version']} had no val accuracy"
        return f"champion: val_acc {val_acc:.4f} > {previous['val_acc']:.4f} of version {previous['version']}"
    if previous is not None and holder == previous["version"]:
        if previous["val_acc"] is None:
            return (f"kept version {holder}: its val accuracy is unknown, so {val_acc:.4f} cannot be shown to "
                    "beat it")
        return f"kept version {holder}: val_acc {val_acc:.4f} <= {previous['val_acc']:.4f}"
    shown = "unknown" if holder_val is None else f"{holder_val:.4f}"
    return f"champion is version {holder} (val_acc {shown}), registered meanwhile; this one has {val_acc:.4f}"
