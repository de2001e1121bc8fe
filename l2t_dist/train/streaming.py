"""The streaming pipeline: each batch decoded from the original images when it is asked for.

For tasks whose decoded splits do not fit in memory (224x224 images: CUB-200, Stanford Dogs,
MIT-67, ...). Nothing but readers and index lists is held; a torch DataLoader with
`data.decode_workers` processes decodes one batch (this rank's shard of it) per item, with the
official transforms on the ORIGINAL image (data/official_transforms.py).

Every batch is still a pure function of (seed, epoch, batch index): the permutation is the
in-memory pipeline's, and each image's crop and flip come from a generator seeded by (seed,
epoch, batch index, position in the GLOBAL batch). No draw touches the global RNG (the
DataLoader is handed its own generator too) or depends on which worker decodes it, so 0, 1 or
2 decode workers give the same bytes, resume mid-epoch is exact, and a data-parallel rank that
decodes only its contiguous shard gets exactly the images one process has in those positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from l2t_dist.config import DataConfig
from l2t_dist.data.official_transforms import eval_image, train_image
from l2t_dist.errors import DataError
from l2t_dist.train.data_pipeline import (
    PREFETCH_PER_WORKER,
    Batch,
    ShardBatch,
    ShardFn,
    Splits,
    batches_per_epoch,
    epoch_permutation,
    image_seed,
)


@dataclass(frozen=True)
class BatchSpec:
    """One batch to decode: reader indices, and one augmentation seed per image (None: eval)."""

    index: int
    items: tuple[int, ...]
    seeds: Optional[tuple[int, ...]]
    global_size: int


class DecodedBatches(torch.utils.data.Dataset):
    """Item k: batch specs[k] decoded to uint8 (n,3,S,S) and int64 labels. A broken image comes
    back as its DataError's message (raised by the caller), not as a worker's traceback."""

    def __init__(self, reader, specs: list[BatchSpec], size: int):
        self.reader, self.specs, self.size = reader, specs, size

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, k: int):
        spec = self.specs[k]
        try:
            images = []
            for n, i in enumerate(spec.items):
                img = self.reader[i][0]
                images.append(eval_image(img, self.size) if spec.seeds is None else
                              train_image(img, self.size, torch.Generator().manual_seed(spec.seeds[n])))
        except DataError as err:
            return None, None, str(err)
        x = torch.stack(images) if images else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        y = torch.tensor([int(self.reader.targets[i]) for i in spec.items], dtype=torch.int64)
        return x, y, None


class StreamingData:
    """The streaming TaskPipeline (train/data_pipeline.py): the splits as readers and indices."""

    def __init__(self, cfg: DataConfig, splits: Splits):
        self.cfg, self.num_classes = cfg, splits.num_classes
        self._splits = {"train": (splits.train_ds, splits.train_idx), "val": (splits.train_ds, splits.val_idx),
                        "test": (splits.test_ds, splits.test_idx)}

    def sizes(self) -> dict[str, int]:
        return {k: len(idx) for k, (_, idx) in self._splits.items()}

    def train_shards(self, seed: int, epoch: int, start: int, stop: int, shard: ShardFn) -> Iterator[ShardBatch]:
        reader, idx = self._splits["train"]
        bs = self.cfg.batch_size
        perm = epoch_permutation(len(idx), seed, epoch).tolist()
        specs = []
        for b in range(start, min(stop, batches_per_epoch(len(idx), bs))):
            batch = perm[b * bs:(b + 1) * bs]
            lo, hi = shard(len(batch))
            seeds = tuple(image_seed(seed, epoch, b, p) for p in range(lo, hi)) if self.cfg.augment else None
            specs.append(BatchSpec(b, tuple(idx[j] for j in batch[lo:hi]), seeds, len(batch)))
        for spec, (x, y) in zip(specs, self._decode(reader, specs)):
            yield spec.index, x, y, spec.global_size

    def split_batches(self, split: str, lo: int, hi: int, batch_size: int) -> Iterator[Batch]:
        reader, idx = self._splits[split]
        chunks = [tuple(idx[k:min(k + batch_size, hi)]) for k in range(lo, hi, batch_size)]
        return self._decode(reader, [BatchSpec(k, items, None, len(items)) for k, items in enumerate(chunks)])

    def _decode(self, reader, specs: list[BatchSpec]) -> Iterator[Batch]:
        """The specs decoded in order, by data.decode_workers processes (0: here)."""
        if not specs:
            return
        workers = min(self.cfg.decode_workers, len(specs))
        loader = torch.utils.data.DataLoader(
            DecodedBatches(reader, specs, self.cfg.image_size), batch_size=None, shuffle=False, num_workers=workers,
            prefetch_factor=PREFETCH_PER_WORKER if workers else None,
            generator=torch.Generator().manual_seed(0))  # else the loader seeds its workers from the global RNG
        for x, y, error in loader:
            if error is not None:
                raise DataError(error)
            yield x, y
