"""Batch norm whose batch moments are summed over the data-parallel ranks, differentiably.

Why not `torch.nn.SyncBatchNorm`: its backward is a fused kernel without a double backward
or a forward-mode formula, and the exact hyper-gradient differentiates the look-ahead's
gradients once more (double backward, and a JVP at its first step). Here the moments are
plain tensor algebra around one differentiable all-reduce (`sum_across_ranks`), whose
backward and JVP are all-reduces too, so autograd composes them to any order.

With it (and `cluster.meta_sync: global`), N ranks holding shards of a global batch compute
exactly what one process computes on the whole batch: the same normalisation in the real step
and in the look-ahead, and the same running statistics. Every rank must run the same forward
and backward calls in the same order (they do: the program is the same and the shapes match).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from l2t_dist.errors import ConfigError


class _SumAcrossRanks(torch.autograd.Function):
    """y = Σ_ranks x. Backward: the cotangents are summed the same way (each rank's output is the
    same function of every rank's input); JVP: the tangents are summed."""

    @staticmethod
    def forward(x: Tensor, group) -> Tensor:
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _SumAcrossRanks.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx, tangent: Tensor, _group):
        return _SumAcrossRanks.apply(tangent, ctx.group)


def sum_across_ranks(x: Tensor, group=None) -> Tensor:
    """Σ over the ranks of `group`, as a differentiable op (to any order, reverse and forward mode)."""
    return _SumAcrossRanks.apply(x, group)


def global_moments(x: Tensor, dims: list, group=None) -> tuple[Tensor, Tensor, float]:
    """(mean, biased variance, count) per channel over every rank's batch, with ONE all-reduce.

    Why one: the collectives are latency-bound (about 1.5 ms each on a busy 2-core machine) and a
    look-ahead runs hundreds of them, so two passes (mean, then the centred squares) cost twice.
    Each rank puts (n_r, Σx, Σ(x − mean_r)²) in its own row of a (world, 2C+1) table; the summed
    table holds every rank's row, and Chan's combination M2 = Σ M2_r + Σ n_r (mean_r − mean)²
    gives the one-process variance without the cancellation of E[x²] − mean²."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n_local = x.numel() // x.shape[1]
    s = x.sum(dims)
    m2 = ((x - (s / max(n_local, 1)).view([1, -1] + [1] * (x.dim() - 2))) ** 2).sum(dims)
    row = torch.cat([x.new_full((1,), float(n_local)), s, m2])
    rows = [row if r == rank else torch.zeros_like(row) for r in range(world)]
    table = sum_across_ranks(torch.stack(rows), group)
    c = x.shape[1]
    counts = table[:, :1].detach()
    sums, m2s = table[:, 1:c + 1], table[:, c + 1:]
    count = counts.sum()
    mean = sums.sum(0) / count
    rank_means = sums / counts.clamp_min(1.0)
    var = (m2s.sum(0) + (counts * (rank_means - mean) ** 2).sum(0)) / count
    return mean, var, float(count)


class MomentSyncBatchNorm(_BatchNorm):
    """A torch BatchNorm{1,2,3}d whose training-mode moments are those of the global batch.

    Installed by `sync_batch_norm_` by changing the class of existing modules, so parameters,
    buffers and state_dict keys stay what they were (θ is collected before this happens).
    Eval mode is torch's own forward (running statistics)."""

    group: Optional[object] = None

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training or self.running_mean is None):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var, count = global_moments(x, dims, self.group)
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: float) -> None:
        """As _BatchNorm.forward does: momentum, or a cumulative average when momentum is None;
        the running variance is the unbiased one."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


class MomentSyncBatchNorm1d(MomentSyncBatchNorm, nn.BatchNorm1d):
    pass


class MomentSyncBatchNorm2d(MomentSyncBatchNorm, nn.BatchNorm2d):
    pass


class MomentSyncBatchNorm3d(MomentSyncBatchNorm, nn.BatchNorm3d):
    pass


_SYNCED = {nn.BatchNorm1d: MomentSyncBatchNorm1d, nn.BatchNorm2d: MomentSyncBatchNorm2d,
           nn.BatchNorm3d: MomentSyncBatchNorm3d}
_TORCH_BN = tuple(_SYNCED)


def unsyncable_layer(module: nn.Module) -> Optional[tuple[str, type]]:
    """The first batch-norm layer with a forward of its own (timm's BatchNormAct2d, ...), whose
    extra computation a synchronised forward would lose; None when every one is torch's."""
    for name, m in module.named_modules():
        if (isinstance(m, _BatchNorm) and not isinstance(m, MomentSyncBatchNorm) and type(m) not in _TORCH_BN
                and type(m).forward not in {c.forward for c in _TORCH_BN + (_BatchNorm,)}):
            return name, type(m)
    return None


def check_sync_bn(module: nn.Module) -> None:
    """Refuse `cluster.sync_bn: true` for a network with an unsyncable batch norm. Called by
    `l2t-dist job` and the Ray driver (validate.py) before any worker starts, and by the
    conversion itself."""
    found = unsyncable_layer(module)
    if found:
        name, cls = found
        raise ConfigError(f"cluster.sync_bn: layer {name!r} is a {cls.__module__}.{cls.__name__}, a "
                          "batch norm with a forward of its own, which cannot be synchronised; use "
                          "cluster.sync_bn: false (per-worker statistics) for this network")


def resolve_sync_bn(setting: Optional[bool], meta_sync: str, module: nn.Module) -> bool:
    """cluster.sync_bn as a run uses it. null (the default) synchronises when it can: with
    meta_sync global and only torch batch norms, so that N workers compute what one process
    computes; per-worker statistics otherwise. true and false are taken as they are."""
    if setting is not None:
        return setting
    return meta_sync == "global" and unsyncable_layer(module) is None


def sync_batch_norm_(module: nn.Module, group=None) -> int:
    """Turn every torch BatchNorm layer of `module` into a MomentSyncBatchNorm in place; returns how many."""
    check_sync_bn(module)
    converted = 0
    for m in module.modules():
        if type(m) in _TORCH_BN:
            m.__class__ = _SYNCED[type(m)]
            m.group = group
            converted += 1
    return converted
