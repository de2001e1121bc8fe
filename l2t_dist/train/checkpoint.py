"""Training checkpoints: everything an exact resume needs, written atomically.

A checkpoint is also a valid source checkpoint (`format`, `arch`, `num_classes`,
`state_dict` of the target), so a trained target can serve as a source in the next job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from l2t_dist.errors import CheckpointError

from l2t_dist.sources.zoo import FORMAT  # a training checkpoint is also a source checkpoint


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
    """torch.load on the CPU, with the project's errors: `missing` says where the file comes from."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}: {missing}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({exc}); it may be truncated") from None


def load_training_state(path: Path) -> dict:
    state = read_checkpoint(path, "a run directory holds last.pt once the first epoch (or checkpoint_every "
                                  "iterations) has finished")
    if not isinstance(state, dict) or state.get("format") != FORMAT or "trainer" not in state:
        raise CheckpointError(f"{str(path)!r} is not an l2t-dist training checkpoint")
    return state
