"""The target task as in-memory uint8 tensors, split by the paper's protocol, and seeded batches.

Why tensors in memory: at 32x32 even all of CIFAR-10 is 150 MB, decoding once is far cheaper
than per-epoch PIL work, and batch-level augmentation with an explicit generator per batch
makes every batch a pure function of (seed, epoch, batch index). That gives exact resume
mid-epoch and lets data-parallel workers cut the same global batch into shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from l2t_dist.config import DataConfig
from l2t_dist.errors import ConfigError, DataError

MAX_IN_MEMORY_SIZE = 96


@dataclass
class TaskData:
    """The three splits as uint8 images (N,3,H,W) and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_y), "val": len(self.val_y), "test": len(self.test_y)}


def _official_indices(prefix: str, part: str) -> Optional[list[int]]:
    from l2t_dist.data import load_l2tww_split

    path = Path(f"{prefix}-{part}")
    if not path.exists():
        return None
    _, indices = load_l2tww_split(str(path))
    return [int(i) for i in indices]


def prepare_data(cfg: DataConfig) -> TaskData:
    """Read, split (10% class-balanced val from train, optional N per class) and decode once."""
    from l2t_dist.data import class_balanced_split, decode_to_tensor, limit_per_class, open_dataset

    if cfg.image_size > MAX_IN_MEMORY_SIZE:
        raise ConfigError(f"data.image_size={cfg.image_size}: the trainer keeps images in memory and supports "
                          f"sizes up to {MAX_IN_MEMORY_SIZE}; use 32 for the paper's CIFAR/STL-10 settings")
    train_ds = open_dataset(cfg.kind, cfg.path, cfg.train_split)
    test_ds = open_dataset(cfg.kind, cfg.path, cfg.test_split)
    if cfg.official_splits:
        train_idx = _official_indices(cfg.official_splits, "train")
        val_idx = _official_indices(cfg.official_splits, "val")
        if train_idx is None or val_idx is None:
            raise DataError(f"data.official_splits={cfg.official_splits!r}: expected files "
                            f"{cfg.official_splits}-train and {cfg.official_splits}-val (and optionally -test)")
        test_idx = _official_indices(cfg.official_splits, "test") or list(range(len(test_ds)))
    else:
        train_idx, val_idx = class_balanced_split(train_ds.targets, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
        test_idx = list(range(len(test_ds)))
    if cfg.per_class is not None:
        train_idx = limit_per_class(train_ds.targets, train_idx, cfg.per_class, seed=cfg.split_seed)
    num_classes = len(train_ds.classes)
    train_x, train_y = decode_to_tensor(train_ds, indices=list(train_idx), size=cfg.image_size)
    val_x, val_y = decode_to_tensor(train_ds, indices=list(val_idx), size=cfg.image_size)
    test_x, test_y = decode_to_tensor(test_ds, indices=test_idx, size=cfg.image_size)
    if len(train_y) < 2:
        raise DataError(f"training split of {cfg.kind}:{cfg.path} has {len(train_y)} images after the split; "
                        "need at least 2 (check data.per_class and data.val_fraction)")
    return TaskData(train_x, train_y, val_x, val_y, test_x, test_y, num_classes)


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """A stable 63-bit seed for one batch: augmentation depends on nothing else."""
    return (seed * 1_000_003 + epoch) * 1_000_033 + index & ((1 << 63) - 1)


def batches_per_epoch(n: int, batch_size: int) -> int:
    # A trailing batch of one image would break batch norm; fold it away.
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0) if full else 1


def epoch_batches(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int, epoch: int,
                  augment: bool, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (index, uint8 images, labels) for one epoch, from batch `start` on (for resume)."""
    from l2t_dist.data import RandomCropFlip

    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(batch_seed(seed, epoch, -1)))
    aug = RandomCropFlip(pad=4) if augment else None
    for b in range(start, batches_per_epoch(len(y), batch_size)):
        idx = perm[b * batch_size:(b + 1) * batch_size]
        xb = x[idx]
        if aug is not None:
            xb = aug(xb, torch.Generator().manual_seed(batch_seed(seed, epoch, b)))
        yield b, xb, y[idx]


def eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(y), batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Cosine annealing stepped once per epoch, as torch's CosineAnnealingLR(T_max=epochs)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))
