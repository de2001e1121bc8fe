"""Explicit gradient averaging as flat buckets (torch.distributed only, no Ray).

Why explicit: DDP's hooks see neither `autograd.grad(..., create_graph=True)` nor functional
calls, so it cannot synchronise the hyper-gradient of φ. L2TStep instead hands its θ-grads
(real step) and φ-grads (meta step) to a `reduce_fn`, the DataParallel strategy's
`reduce_grads` (train/parallel.py), which averages them in place: tensors are packed into a
few flat buffers per (device, dtype), each buffer is all-reduced with SUM and divided by the
world size. Every rank receives the same bits, so
replicas that apply the same update stay identical.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_BUCKET_BYTES = 32 << 20


def _buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices grouped by (device, dtype), each group cut into chunks of about bucket_bytes.
    The grouping depends only on shapes and dtypes, so it is the same on every rank."""
    groups: dict[tuple, list[list[int]]] = {}
    sizes: dict[tuple, int] = {}
    for i, t in enumerate(tensors):
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        if key not in groups or (sizes[key] + nbytes > bucket_bytes and groups[key][-1]):
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(i)
        sizes[key] += nbytes
    return [b for bs in groups.values() for b in bs if b]


def flat_all_reduce_(tensors: Sequence[Tensor], *, scale: float = 1.0, average: bool = True,
                     group: Optional[object] = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """In place: t <- (Σ_ranks scale_r · t_r) / world (or the plain sum with average=False)."""
    if not tensors:
        return
    world = dist.get_world_size(group)
    for idx in _buckets(tensors, bucket_bytes):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        if scale != 1.0:
            flat.mul_(scale)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if average and world > 1:
            flat.div_(world)
        offset = 0
        with torch.no_grad():
            for i in idx:
                t = tensors[i]
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t))
                offset += n


def broadcast_(tensors: Sequence[Tensor], src: int = 0, group: Optional[object] = None) -> None:
    """Overwrite every rank's tensors with rank `src`'s (flat buckets, in place)."""
    for idx in _buckets(tensors, DEFAULT_BUCKET_BYTES):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        with torch.no_grad():
            for i in idx:
                n = tensors[i].numel()
                tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))
                offset += n


def replica_max_diff(tensors: Sequence[Tensor], group: Optional[object] = None) -> float:
    """max over elements of (max over ranks − min over ranks): 0.0 when every rank holds the same values."""
    floats = [t.detach().reshape(-1).double() for t in tensors if t.is_floating_point()]
    if not floats:
        return 0.0
    flat = torch.cat(floats)
    hi, lo = flat.clone(), flat.neg()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX, group=group)  # -min
    return float((hi + lo).max()) if flat.numel() else 0.0
