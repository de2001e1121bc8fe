"""Brute-force reference: differentiate through a functional copy of every look-ahead step.

Slow and memory-hungry (the whole unrolled graph is alive at once); it exists so that tests
can check `hypergradient` against plain autograd, not for training.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from l2t_dist.bilevel.hypergrad import Loss, check_lookahead, leaves
from l2t_dist.bilevel.objective import InnerObjective
from l2t_dist.bilevel.sgd import SGDHyper


def unrolled_hypergradient(params0: Sequence[Tensor], bufs0: Sequence[Tensor], meta_params: Sequence[Tensor],
                           inner: InnerObjective, outer_loss: Loss, T: int,
                           hp: SGDHyper) -> tuple[Tensor, list[Tensor]]:
    """Same contract as `hypergradient`, by autograd through all T+1 steps with create_graph."""
    check_lookahead(T, "keep")
    theta = leaves(params0)
    v = [b.detach().clone() for b in bufs0]
    for k in range(1, T + 2):
        loss = (inner.loss if k <= T else outer_loss)(theta)
        g = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
        g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, theta)]
        v = [hp.momentum * vi + gi + hp.weight_decay * ti for vi, gi, ti in zip(v, g, theta)]
        theta = [ti - hp.lr * vi for ti, vi in zip(theta, v)]
    meta_loss = outer_loss(theta)
    grads = torch.autograd.grad(meta_loss, list(meta_params), allow_unused=True, retain_graph=True)
    return meta_loss.detach(), [torch.zeros_like(p) if g is None else g for g, p in zip(grads, meta_params)]
