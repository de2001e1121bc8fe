"""The state that crosses a file or a process: `TrainingState` (last.pt, best.pt) and
`RunSummary` (what a run returns), read and written here and nowhere else.

A training checkpoint is also a valid source checkpoint (`format`, `arch`, `num_classes`,
`state_dict` of the target), so a trained target can serve as a source in the next job; the
resume state sits under `trainer`, with a version number. Everything in it is a tensor or a
plain value (RNG states are byte tensors), so it loads with `torch.load(weights_only=True)`:
reading a checkpoint never runs code.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch

from l2t_dist.errors import CheckpointError
from l2t_dist.sources.zoo import FORMAT  # a training checkpoint is also a source checkpoint

STATE_VERSION = 2  # 1: the untyped layout of l2t-dist <= 0.9 (no version key)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path, missing: str) -> Any:
    """torch.load on the CPU with weights_only=True, with the project's errors; `missing` says
    where the file comes from."""
    import pickle

    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}: {missing}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} holds Python objects beyond tensors and plain values "
                              f"({str(exc).splitlines()[0]}); l2t-dist never writes such files, and loading it "
                              "could run code, so it is refused") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({exc}); it may be truncated") from None


@dataclass
class TrainingState:
    """Everything an exact resume needs: the modules' state, the optimisers', the position in
    the schedule, the best-by-val record, the epoch history and the RNG."""

    job: dict                      # the job tree (JobConfig.model_dump(mode="json"))
    arch: str
    num_classes: int
    target: dict                   # the target network's state_dict
    student: dict                  # θ: target + regressors (+ LwF head)
    phi: Optional[dict]            # the meta-networks' state_dict, None without them
    step: dict                     # L2TStep.state_dict(): momentum, Adam, iteration
    epoch: int = 0                 # epochs finished
    batch: int = 0                 # batches finished in the epoch in progress
    global_step: int = 0
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "test_acc": None, "epoch": None})
    history: list = field(default_factory=list)
    sums: dict = field(default_factory=dict)  # running sums of the epoch in progress
    rng: dict = field(default_factory=rng_state)
    version: int = STATE_VERSION

    def to_checkpoint(self) -> dict:
        trainer = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.name not in ("arch", "num_classes", "target")}
        return {"format": FORMAT, "arch": self.arch, "num_classes": self.num_classes, "state_dict": self.target,
                "meta": {"epoch": self.epoch, "best_val_acc": self.best["val_acc"],
                         "job": (self.job.get("run") or {}).get("name")},
                "trainer": trainer}

    @classmethod
    def from_checkpoint(cls, obj: Any, where: str) -> "TrainingState":
        if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("trainer"), dict):
            raise CheckpointError(f"{where!r} is not an l2t-dist training checkpoint")
        trainer = obj["trainer"]
        version = trainer.get("version", 1)
        if version != STATE_VERSION:
            raise CheckpointError(f"{where!r} holds training state version {version}, and this l2t-dist reads "
                                  f"version {STATE_VERSION}; resume it with the l2t-dist that wrote it, or start "
                                  "a new run (its best.pt still loads as a source checkpoint)")
        names = {f.name for f in fields(cls)} - {"arch", "num_classes", "target"}
        missing = sorted(names - set(trainer) - {"version"})
        if missing:
            raise CheckpointError(f"{where!r} is an incomplete training checkpoint (no {', '.join(missing)})")
        return cls(arch=obj["arch"], num_classes=int(obj["num_classes"]), target=obj["state_dict"],
                   **{k: trainer[k] for k in names})

    def save(self, path: Path) -> None:
        save_atomic(self.to_checkpoint(), path)

    @classmethod
    def load(cls, path: Path) -> "TrainingState":
        obj = read_checkpoint(Path(path), "a run directory holds last.pt once the first epoch (or "
                                          "checkpoint_every iterations) has finished")
        return cls.from_checkpoint(obj, str(path))

    @property
    def finished(self) -> bool:
        return self.epoch >= int(self.job["optim"]["epochs"])


@dataclass
class RunSummary:
    """What a training run returns (and `--json` prints): accuracies, speed, the learned λ."""

    run_dir: str
    method: str
    epochs: int
    best_val_acc: float
    test_acc_at_best_val: Optional[float]
    best_epoch: Optional[int]
    final_val_acc: Optional[float] = None
    final_test_acc: Optional[float] = None
    images_per_s: Optional[float] = None
    pairs: dict = field(default_factory=dict)
    backend: str = "local"
    workers: int = 1
    replica_max_diff: float = 0.0
    wait_fraction: float = 0.0
    allreduce_bytes_per_iter: float = 0.0   # gradient bytes one rank all-reduced per iteration (0: one process)
    # --backend ray only
    restored_at_step: Optional[int] = None
    restored_by: Optional[str] = None       # "ray-failover" or "resume"
    feature_bytes_per_image: Optional[dict] = None
    worker_nodes: Optional[list] = None
    ray_storage: Optional[str] = None
    source_actors: Optional[dict] = None
    source_nodes: Optional[dict] = None
    sync_bn: Optional[bool] = None          # whether the workers synchronised batch norm (cluster.sync_bn resolved)
    # tracking
    mlflow: Optional[dict] = None

    @classmethod
    def from_state(cls, state: TrainingState, run_dir: Path, **extra) -> "RunSummary":
        """The summary a checkpoint implies (when the process that trained is gone)."""
        last = state.history[-1] if state.history else {}
        return cls(run_dir=str(run_dir), method=state.job["method"]["name"], epochs=state.epoch,
                   best_val_acc=state.best["val_acc"], test_acc_at_best_val=state.best["test_acc"],
                   best_epoch=state.best["epoch"], final_val_acc=last.get("val_acc"),
                   final_test_acc=last.get("test_acc"), images_per_s=last.get("images_per_s"), **extra)

    def to_dict(self) -> dict:
        return asdict(self)
