"""Parallel strategies: what the training loop asks of "the other ranks", in one object.

The loop is written once, for a world of any size; a strategy owns sharding, gradient and
metric reduction, evaluation counts, buffer synchronisation, who writes the run directory,
and agreeing on a failure. `SingleProcess` is the world of one (every call is the identity);
`DataParallel` runs over a torch.distributed group (Ray Train workers, torchrun, a test).

Data-parallel semantics (docs/distributed.md): every rank builds the same global batch and
takes a contiguous shard of it; the real-step θ-grads and the φ hyper-grads are averaged
weighted by shard size (the gradient of the global-batch mean), so replicas stay identical;
val/test are counted in shards and the counts summed; rank 0 writes. The look-ahead:
- `meta_sync="per_shard"`: each rank looks ahead on its own shard and the hyper-gradients
  are averaged (one φ all-reduce per iteration; not the one-process algorithm);
- `meta_sync="global"` (the default, as in the job schema): every look-ahead gradient and
  every θ-product of the reverse sweep is averaged too, so each rank walks the global-batch
  look-ahead and the hyper-gradient is the one-process one (2T+2 more θ-sized all-reduces per
  iteration). Losses are scaled by n_r·world/N instead of weighting the reduction, which
  stays exact through `sync_bn`.
Batch norm normalises with the global batch's moments (`sync_bn`, distributed/sync_bn.py;
by default whenever meta_sync is global and every batch norm is torch's): then N ranks
compute what one process computes on the global batch. Otherwise it keeps per-rank
statistics, averaged before evaluation and checkpoints.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from l2t_dist.errors import AgreedFailure, ConfigError, L2TError

MIN_SHARD = 2  # batch norm needs more than one value per channel, and 1x1 taps exist
META_SYNCS = ("per_shard", "global")


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [lo, hi) of rank's shard of n items; the first n mod world shards get one more."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def check_batch_size(batch_size: int, world: int) -> None:
    if batch_size < MIN_SHARD * world:
        raise ConfigError(f"data.batch_size={batch_size} is too small for {world} worker(s): every worker needs a "
                          f"shard of at least {MIN_SHARD} images; use data.batch_size >= {MIN_SHARD * world}"
                          + (" or fewer cluster.workers" if world > 1 else ""))


class SingleProcess:
    """The world of one: local training."""

    rank, world, is_writer, name = 0, 1, True, "local"

    lookahead_sync = None  # the look-ahead needs no averaging in a world of one

    def __init__(self):
        self.reduces = 0  # gradient reductions asked for (θ-grads and φ-grads, per iteration)
        self.reduced_bytes = 0

    def prepare_model(self, module: torch.nn.Module) -> None:
        """Called once on the student before training (DataParallel may synchronise its BN)."""

    def loss_scale(self) -> float:
        return 1.0

    def shard(self, n: int) -> tuple[int, int]:
        return 0, n

    def weigh(self, share: float) -> None:
        """This rank's share of the global batch about to be stepped on."""

    def reduce_grads(self, grads: list[Tensor]) -> None:
        self.reduces += 1

    def reduce_metrics(self, metrics: dict[str, float], share: float, device: torch.device) -> dict[str, float]:
        return metrics

    def sum_count(self, count: int, device: torch.device) -> int:
        return count

    def average_buffers(self, buffers: Sequence[Tensor]) -> None:
        pass

    def broadcast(self, tensors: Sequence[Tensor]) -> None:
        pass

    def replica_diff(self, tensors: Sequence[Tensor]) -> float:
        return 0.0

    def agree(self, failure: Optional[L2TError]) -> None:
        if failure is not None:
            raise failure

    def agreed(self, err: L2TError) -> L2TError:
        return err


class DataParallel:
    """One rank of a torch.distributed group (gloo on CPUs, nccl on GPUs)."""

    name = "data_parallel"

    def __init__(self, rank: int, world: int, group=None, meta_sync: str = "global",
                 sync_bn: Optional[bool] = None):
        if meta_sync not in META_SYNCS:
            raise ConfigError(f"unknown cluster.meta_sync {meta_sync!r}; allowed: {', '.join(META_SYNCS)}")
        if sync_bn and meta_sync != "global":
            raise ConfigError("cluster.sync_bn needs cluster.meta_sync: global (a look-ahead per shard has no "
                              "global batch to take the moments of)")
        self.rank, self.world, self.group = rank, world, group
        self.meta_sync, self.sync_bn = meta_sync, sync_bn
        self.is_writer = rank == 0
        self.reduces = 0
        self.reduced_bytes = 0  # gradient bytes this rank all-reduced (benchmarks, docs/distributed.md)
        self._share = 1.0 / world
        self.lookahead_sync = self._average if meta_sync == "global" else None

    def prepare_model(self, module: torch.nn.Module) -> None:
        """Synchronise the student's batch norms when cluster.sync_bn asks or (null) can."""
        from l2t_dist.distributed.sync_bn import resolve_sync_bn, sync_batch_norm_

        self.sync_bn = resolve_sync_bn(self.sync_bn, self.meta_sync, module)
        if self.sync_bn:
            sync_batch_norm_(module, self.group)

    def loss_scale(self) -> float:
        """n_r·world/N in global mode (the ranks' average of scaled shard means is the global
        mean); 1.0 per shard, where the reduction is weighted instead."""
        return self._share * self.world if self.meta_sync == "global" else 1.0

    def shard(self, n: int) -> tuple[int, int]:
        return shard_bounds(n, self.rank, self.world)

    def weigh(self, share: float) -> None:
        self._share = share

    def reduce_grads(self, grads: list[Tensor]) -> None:
        """Σ_r (n_r / N) g_r in place: every rank gets the same bits. In global mode the losses
        already carry the weights (loss_scale), so this is the plain average."""
        self.reduces += 1
        if self.meta_sync == "global":
            self._average(grads)
        else:
            self._average(grads, scale=self._share * self.world)

    def _average(self, tensors: list[Tensor], scale: float = 1.0) -> None:
        from l2t_dist.distributed.allreduce import flat_all_reduce_

        self.reduced_bytes += sum(t.numel() * t.element_size() for t in tensors)
        flat_all_reduce_(tensors, scale=scale, group=self.group)

    def reduce_metrics(self, metrics: dict[str, float], share: float, device: torch.device) -> dict[str, float]:
        import torch.distributed as dist

        keys = sorted(metrics)
        vec = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device) * share
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=self.group)
        return dict(zip(keys, vec.tolist()))

    def sum_count(self, count: int, device: torch.device) -> int:
        import torch.distributed as dist

        total = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return int(total.item())

    def average_buffers(self, buffers: Sequence[Tensor]) -> None:
        from l2t_dist.distributed.allreduce import flat_all_reduce_

        flat_all_reduce_(list(buffers), group=self.group)

    def broadcast(self, tensors: Sequence[Tensor]) -> None:
        from l2t_dist.distributed.allreduce import broadcast_

        with torch.no_grad():
            broadcast_(list(tensors), group=self.group)

    def replica_diff(self, tensors: Sequence[Tensor]) -> float:
        from l2t_dist.distributed.allreduce import replica_max_diff

        return replica_max_diff(list(tensors), group=self.group)

    def agree(self, failure: Optional[L2TError]) -> None:
        """Collective: every rank raises the first failing rank's error, or none does. A
        deterministic error on one rank (a checkpoint missing on its node) must neither leave
        the others waiting in the next collective nor be retried."""
        import torch.distributed as dist

        errs: list = [None] * self.world
        dist.all_gather_object(errs, failure, group=self.group)
        first = next((e for e in errs if e is not None), None)
        if first is not None:
            raise AgreedFailure(first)

    def agreed(self, err: L2TError) -> L2TError:
        """An error that every rank raises at the same point (the NaN checks follow the
        all-reduce): agreed as it stands; a retryable one is left for Ray Train to restart."""
        return err if err.retryable or isinstance(err, AgreedFailure) else AgreedFailure(err)
