"""The target task, split by the paper's protocol, and its seeded batches: the loop's data.

Two pipelines behind one interface (`TaskPipeline`), chosen by `data.pipeline`:
- memory (`TaskData`): every split decoded once into uint8 tensors. At 32x32 even all of
  CIFAR-10 is 150 MB, decoding once is far cheaper than per-epoch PIL work, and the pad-4
  crop + flip runs on whole batches;
- stream (train/streaming.py: `StreamingData`): readers and indices only; each batch is
  decoded from the original images in DataLoader worker processes, with the official
  RandomResizedCrop (train) or Resize + CenterCrop (eval): 224x224 tasks do not fit in memory.
Either way a batch is a pure function of (seed, epoch, batch index): the permutation and every
augmentation draw come from generators seeded by those (never the global RNG), which gives
exact resume mid-epoch and lets data-parallel ranks cut the same global batch into shards.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import torch

from l2t_dist.config import DataConfig
from l2t_dist.errors import ConfigError, DataError

MAX_IN_MEMORY_SIZE = 96
IN_MEMORY_BUDGET = 2 * 2**30  # auto streams when the decoded splits would take more (bytes)
PREFETCH_PER_WORKER = 2  # streaming: batches each decode worker keeps ready (the DataLoader's prefetch_factor)

ShardFn = Callable[[int], tuple[int, int]]  # global batch size -> this rank's [lo, hi)
ShardBatch = tuple[int, torch.Tensor, torch.Tensor, int]  # (index, uint8 images, labels, global batch size)
Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images, labels


class TaskPipeline(Protocol):
    """What the training loop asks of its data (TaskData in memory, StreamingData streamed)."""

    num_classes: int

    def sizes(self) -> dict[str, int]: ...

    def train_shards(self, seed: int, epoch: int, start: int, stop: int, shard: ShardFn) -> Iterator[ShardBatch]:
        """This rank's shard of global batches start..stop-1 of `epoch`."""

    def split_batches(self, split: str, lo: int, hi: int, batch_size: int) -> Iterator[Batch]:
        """Images lo..hi-1 of split "val" or "test", unaugmented, in batches of batch_size."""


@dataclass
class Splits:
    """The readers and the indices of the three splits: what both pipelines start from."""

    train_ds: object
    test_ds: object
    train_idx: list[int]
    val_idx: list[int]
    test_idx: list[int]
    num_classes: int

    def images(self) -> int:
        return len(self.train_idx) + len(self.val_idx) + len(self.test_idx)


@dataclass
class TaskData:
    """The in-memory pipeline: the three splits as uint8 images (N,3,H,W) and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    cfg: DataConfig  # batch size and augmentation of train_shards

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_y), "val": len(self.val_y), "test": len(self.test_y)}

    def train_shards(self, seed: int, epoch: int, start: int, stop: int, shard: ShardFn) -> Iterator[ShardBatch]:
        batches = epoch_batches(self.train_x, self.train_y, batch_size=self.cfg.batch_size, seed=seed, epoch=epoch,
                                augment=self.cfg.augment, start=start)
        for b, xb, yb in itertools.islice(batches, max(0, stop - start)):
            lo, hi = shard(len(yb))
            yield b, xb[lo:hi], yb[lo:hi], len(yb)

    def split_batches(self, split: str, lo: int, hi: int, batch_size: int) -> Iterator[Batch]:
        x, y = {"val": (self.val_x, self.val_y), "test": (self.test_x, self.test_y)}[split]
        return eval_batches(x[lo:hi], y[lo:hi], batch_size)


def _official_indices(prefix: str, part: str) -> Optional[list[int]]:
    from l2t_dist.data import load_l2tww_split

    path = Path(f"{prefix}-{part}")
    if not path.exists():
        return None
    _, indices = load_l2tww_split(str(path))
    return [int(i) for i in indices]


def read_splits(cfg: DataConfig) -> Splits:
    """Open the readers and split: 10% class-balanced val from train (or the official files),
    optionally N training images per class. Reads labels and file lists, no pixels."""
    from l2t_dist.data import class_balanced_split, limit_per_class, open_dataset

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
    if len(train_idx) < 2:
        raise DataError(f"training split of {cfg.kind}:{cfg.path} has {len(train_idx)} images after the split; "
                        "need at least 2 (check data.per_class and data.val_fraction)")
    return Splits(train_ds, test_ds, list(train_idx), list(val_idx), list(test_idx), len(train_ds.classes))


def decoded_bytes(images: int, size: int) -> int:
    """Bytes of `images` uint8 images of size x size: what the in-memory pipeline holds."""
    return images * 3 * size * size


def check_in_memory(cfg: DataConfig) -> None:
    if cfg.image_size > MAX_IN_MEMORY_SIZE:
        raise ConfigError(f"data.pipeline=memory with data.image_size={cfg.image_size}: the in-memory pipeline keeps "
                          f"decoded images and supports sizes up to {MAX_IN_MEMORY_SIZE}; use data.pipeline=stream "
                          "(or auto), which decodes each batch from the original images")


def pipeline_kind(cfg: DataConfig, images: int) -> str:
    """Which pipeline data.pipeline means, "memory" or "stream": auto streams above
    MAX_IN_MEMORY_SIZE px or when the decoded splits (`images` of them) would exceed
    IN_MEMORY_BUDGET. A function of the job and the dataset's size only, never of this
    machine's free memory: every rank, and every resume, must pick the same pipeline (their
    augmentations differ)."""
    if cfg.pipeline == "memory":
        check_in_memory(cfg)
        return "memory"
    if cfg.pipeline == "stream":
        return "stream"
    big = cfg.image_size > MAX_IN_MEMORY_SIZE or decoded_bytes(images, cfg.image_size) > IN_MEMORY_BUDGET
    return "stream" if big else "memory"


def decode_splits(cfg: DataConfig, splits: Splits) -> TaskData:
    """The in-memory pipeline: every split decoded once (resized to data.image_size)."""
    from l2t_dist.data import decode_to_tensor

    size = cfg.image_size
    train_x, train_y = decode_to_tensor(splits.train_ds, indices=splits.train_idx, size=size)
    val_x, val_y = decode_to_tensor(splits.train_ds, indices=splits.val_idx, size=size)
    test_x, test_y = decode_to_tensor(splits.test_ds, indices=splits.test_idx, size=size)
    return TaskData(train_x, train_y, val_x, val_y, test_x, test_y, splits.num_classes, cfg)


def prepare_data(cfg: DataConfig) -> TaskData:
    """The task in memory, whatever data.pipeline says (tests and the one-process reference)."""
    check_in_memory(cfg)
    return decode_splits(cfg, read_splits(cfg))


def open_data(cfg: DataConfig) -> TaskPipeline:
    """The pipeline that data.pipeline asks for (auto: see pipeline_kind)."""
    splits = read_splits(cfg)
    if pipeline_kind(cfg, splits.images()) == "stream":
        from l2t_dist.train.streaming import StreamingData

        return StreamingData(cfg, splits)
    return decode_splits(cfg, splits)


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """A stable 63-bit seed for one batch: augmentation depends on nothing else."""
    return (seed * 1_000_003 + epoch) * 1_000_033 + index & ((1 << 63) - 1)


def image_seed(seed: int, epoch: int, index: int, position: int) -> int:
    """The seed of one image's augmentation (streaming): its position in the GLOBAL batch,
    so any process, any shard of it, draws the same crop. splitmix64 mixes the bits because
    torch's CPU generator keeps only the low 32 bits of a seed."""
    z = (batch_seed(seed, epoch, index) * 1_000_037 + position + 0x9E3779B97F4A7C15) & (2**64 - 1)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & (2**64 - 1)
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & (2**64 - 1)
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training images in `epoch`."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(batch_seed(seed, epoch, -1)))


def batches_per_epoch(n: int, batch_size: int) -> int:
    # A trailing batch of one image would break batch norm; fold it away.
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0) if full else 1


def epoch_batches(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int, epoch: int,
                  augment: bool, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (index, uint8 images, labels) for one epoch, from batch `start` on (for resume)."""
    from l2t_dist.data import RandomCropFlip

    perm = epoch_permutation(len(y), seed, epoch)
    aug = RandomCropFlip(pad=4) if augment else None
    for b in range(start, batches_per_epoch(len(y), batch_size)):
        idx = perm[b * batch_size:(b + 1) * batch_size]
        xb = x[idx]
        if aug is not None:
            xb = aug(xb, torch.Generator().manual_seed(batch_seed(seed, epoch, b)))
        yield b, xb, y[idx]


def eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[Batch]:
    for start in range(0, len(y), batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Cosine annealing stepped once per epoch, as torch's CosineAnnealingLR(T_max=epochs)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))
