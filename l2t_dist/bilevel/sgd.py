"""SGD with momentum and weight decay, in PyTorch's exact semantics, on plain tensor lists.

Why not `torch.optim.SGD`: it skips parameters whose `.grad` is None, but in L2T-ww every
parameter of θ takes part in every step (a parameter the loss does not reach still moves by
weight decay and momentum), and the look-ahead needs an out-of-place update so that the
graphs kept for the hyper-gradient still see the old iterate. The arithmetic mirrors
`torch.optim.SGD` (dampening 0, no nesterov) op for op, so the real step is bit-identical to it
whenever every parameter has a gradient. Momentum buffers start at zero: μ·0 + g' = g' is
exactly PyTorch's first-step `buf = g'.clone()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from l2t_dist.errors import ConfigError


@dataclass
class SGDHyper:
    """Step hyper-parameters; the trainer mutates `lr` once per epoch (cosine schedule)."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"SGD learning rate must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"SGD momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"SGD weight decay must be >= 0, got {self.weight_decay}")


def zero_bufs(params: Sequence[Tensor]) -> list[Tensor]:
    """Fresh momentum buffers (zeros), one per parameter."""
    return [torch.zeros_like(p, memory_format=torch.preserve_format).detach() for p in params]


def _direction_(params: Sequence[Tensor], bufs: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                hp: SGDHyper, overwrite: bool) -> list[Tensor]:
    """bufs ← μ·bufs + (g + wd·θ), in place (foreach: few kernels); None grads count as zero.

    `overwrite`: compute g + wd·θ into the grads themselves, which saves allocating (and
    page-faulting) a θ-sized temporary per step; only for grads that carry no graph and that
    the caller is done with. The arithmetic is the same either way.
    """
    ps = [p.detach() for p in params]
    gs = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, ps)]
    if hp.weight_decay != 0:
        if overwrite:
            torch._foreach_add_(gs, ps, alpha=hp.weight_decay)
        else:
            gs = torch._foreach_add(gs, ps, alpha=hp.weight_decay)
    torch._foreach_mul_(bufs, hp.momentum)
    torch._foreach_add_(bufs, gs)
    return ps


def _check(params, bufs, grads) -> None:
    if not (len(params) == len(bufs) == len(grads)):
        raise ValueError(f"params, bufs and grads differ in length: {len(params)}, {len(bufs)}, {len(grads)}")


@torch.no_grad()
def sgd_step_(params: Sequence[Tensor], bufs: Sequence[Tensor],
              grads: Sequence[Optional[Tensor]], hp: SGDHyper) -> None:
    """One SGD step in place on `params` (their `.data`) and `bufs`; None grad = 0.

    The grads are consumed: they are overwritten with g + wd·θ (the real step has no further
    use for them, and torch.optim.SGD would allocate that sum anew for every parameter).
    """
    _check(params, bufs, grads)
    if params:
        torch._foreach_add_(_direction_(params, bufs, grads, hp, overwrite=True), bufs, alpha=-hp.lr)


@torch.no_grad()
def sgd_update(params: Sequence[Tensor], bufs: Sequence[Tensor],
               grads: Sequence[Optional[Tensor]], hp: SGDHyper) -> list[Tensor]:
    """Out-of-place step: returns new detached parameters, updates `bufs` in place; grads are read only.

    The look-ahead uses this form: graphs kept for the reverse sweep hold the old iterate
    (and the grads, which they also hold, stay intact).
    """
    _check(params, bufs, grads)
    if not params:
        return []
    return list(torch._foreach_add(_direction_(params, bufs, grads, hp, overwrite=False), bufs, alpha=-hp.lr))
