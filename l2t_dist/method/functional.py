"""Calling a module as a pure function of θ, and guarding its batch-norm statistics.

The look-ahead differentiates the student at iterates that are not its current weights, so it
calls it through `torch.func.functional_call`. Buffers are cloned *inside* each call: in train
mode batch norm writes its running statistics in place, which `torch.func` transforms refuse
on captured tensors, and which must not leak into the real model anyway (the running stats
after an iteration are those of the real step alone).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call


class FunctionalModule:
    """`f(params, *args)`: `module(*args)` with `params` standing in for the parameters `names`."""

    def __init__(self, module: nn.Module, names: Sequence[str]):
        known = dict(module.named_parameters())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{unknown} are not parameters of {type(module).__name__}")
        self.module = module
        self.names = list(names)

    def __call__(self, params: Sequence[Tensor], *args, **kwargs):
        # Buffers are looked up per call: .to()/.double() may have replaced them.
        state = {n: b.clone() for n, b in self.module.named_buffers()}
        state.update(zip(self.names, params))
        return functional_call(self.module, state, args, kwargs)


@contextmanager
def preserved_buffers(module: nn.Module):
    """Restore every buffer (batch-norm running stats, counters) bit for bit on exit."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)
