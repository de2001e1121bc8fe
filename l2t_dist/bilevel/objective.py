"""The inner (matching) objective as the hyper-gradient engine sees it.

θ is a list of plain tensors and φ enters only through the objective's closure, so the
engine works for any differentiable function, from a toy quadratic to a CNN called through
`torch.func.functional_call`. When the loss has the factored form

    loss(θ) = Σ_i (weights_i * terms_i(θ)).sum(),   weights_i = weights_i(φ), terms_i = terms_i(θ)

(L2T-ww's matching loss: weights = β/B·λ·w, terms = the per-(sample, channel) distances D),
the mixed product (∂G/∂φ)ᵀã of the first look-ahead step needs no double backward: it is
∂/∂φ Σ weights·JVP(terms, ã), one forward-mode pass plus a tiny backward into the meta-nets.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor


class InnerObjective:
    """The β-scaled matching loss of the look-ahead; a pure function of θ (φ is closed over).

    Subclasses implement `loss`, or `terms` + `weights` for the factored form (then `loss`
    follows). `weights()` must return the *same* tensors on every call (computed once per
    batch, with their graph to φ): the engine differentiates the mixed products with respect
    to them and maps the sum to φ with one backward at the end. `terms` must be functional
    (no in-place writes to captured tensors), since it runs under `torch.func.jvp`.
    """

    def loss(self, params: Sequence[Tensor]) -> Tensor:
        ws = self.weights()
        if ws is None:
            raise NotImplementedError("an InnerObjective defines loss(params), or terms(params) and weights()")
        return sum((w * t).sum() for w, t in zip(ws, self.terms(params)))

    def terms(self, params: Sequence[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def weights(self) -> Optional[list[Tensor]]:
        """None means: no factored form, use the generic double backward into φ."""
        return None


class FunctionObjective(InnerObjective):
    """A plain loss function of θ (generic route)."""

    def __init__(self, fn: Callable[[Sequence[Tensor]], Tensor]):
        self.fn = fn

    def loss(self, params):
        return self.fn(params)


class FactoredObjective(InnerObjective):
    """Σ_i (weights_i * terms_fn(θ)_i).sum() with fixed weight tensors (functions of φ)."""

    def __init__(self, terms_fn: Callable[[Sequence[Tensor]], list[Tensor]], weights: Sequence[Tensor]):
        self.terms_fn = terms_fn
        self._weights = list(weights)

    def terms(self, params):
        return self.terms_fn(params)

    def weights(self):
        return self._weights


class ScaledObjective(InnerObjective):
    """c · inner, in the same form (factored stays factored: the weights are scaled once).

    A data-parallel rank's share of the global-batch objective: its shard's mean times
    c = n_r·world/N, so that the ranks' average is the global mean (cluster.meta_sync: global)."""

    def __init__(self, inner: InnerObjective, scale: float):
        self.inner, self.scale = inner, float(scale)
        ws = inner.weights()
        self._weights = None if ws is None else [w * self.scale for w in ws]

    def loss(self, params):
        return super().loss(params) if self._weights is not None else self.inner.loss(params) * self.scale

    def terms(self, params):
        return self.inner.terms(params)

    def weights(self):
        return self._weights
