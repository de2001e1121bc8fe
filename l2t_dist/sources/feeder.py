"""Source features for the training loop: one protocol, two implementations, one prefetcher.

A feeder takes a batch of uint8 images and hands back the frozen sources' feature maps:
`submit(x_uint8) -> handle`, then `result(handle) -> {source: {tap: map, "logits": ...}}`.
The colocated feeder runs the sources in this process when the result is asked for; the
served client (distributed/serving.py) sends the batch to Ray actors at submit time, so that
`prefetched` can keep `feeder.prefetch` batches in flight while the step runs.

The loop passes in, explicitly, which taps of which source the pairs use (`TapRequest`), and
images travel as uint8: `model_input` (data.transforms) normalises them wherever they land.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Protocol

import torch

Features = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TapRequest:
    """What one source must compute per batch: these taps, and its logits (LwF)."""

    taps: tuple[str, ...]
    logits: bool = False


class Feeder(Protocol):
    prefetch: int  # batches submitted ahead of the one being stepped on

    def submit(self, x_uint8: torch.Tensor) -> Any: ...

    def result(self, handle: Any) -> Features: ...


@torch.no_grad()
def source_features(sources: Iterable, requests: Mapping[str, TapRequest], x: torch.Tensor) -> Features:
    """The requested maps of every requested source for normalised images x.

    `no_grad` rather than `inference_mode`: the features feed the meta-networks, whose
    backward must save them, and inference tensors cannot be saved for backward."""
    out: Features = {}
    for src in sources:
        req = requests.get(src.name)
        if req is None:
            continue
        logits, feats = src.model.forward_taps(x, list(req.taps), logits=req.logits)
        if req.logits:
            feats["logits"] = logits
        out[src.name] = feats
    return out


class ColocatedFeeder:
    """The sources inside the training process (no Ray): nothing runs ahead."""

    prefetch = 0

    def __init__(self, sources: Iterable, requests: Mapping[str, TapRequest], device: torch.device):
        self.sources, self.requests, self.device = list(sources), dict(requests), device

    def submit(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return x_uint8

    def result(self, x_uint8: torch.Tensor) -> Features:
        from l2t_dist.data import model_input

        return source_features(self.sources, self.requests, model_input(x_uint8, self.device))


@dataclass
class Shard:
    """This rank's part of global batch `index`, with its features on the way."""

    index: int
    x: torch.Tensor        # uint8 images of this rank's shard
    y: torch.Tensor
    global_size: int       # images in the whole global batch
    handle: Any

    @property
    def share(self) -> float:
        return len(self.y) / self.global_size


def prefetched(shards: Iterable[tuple[int, torch.Tensor, torch.Tensor, int]], feeder: Feeder) -> Iterator[Shard]:
    """(index, this rank's uint8 images, labels, global batch size) -> Shards, each submitted
    `feeder.prefetch` batches ahead. The shards come already cut (train/data_pipeline.py:
    TaskPipeline.train_shards), so that a streaming rank decodes only its own images."""
    queue: list[Shard] = []
    for b, x, y, global_size in shards:
        queue.append(Shard(b, x, y, global_size, feeder.submit(x)))
        while len(queue) > feeder.prefetch:
            yield queue.pop(0)
    yield from queue
