"""The look-ahead of L2T-ww and the exact hyper-gradient of its meta-loss, by an adjoint sweep.

Look-ahead from (θ0, v0): steps k = 1..T on the matching loss G_k = ∇ inner.loss, then step
T+1 on the task loss, each

    v_k = μ v_{k-1} + G_k(θ_{k-1}) + wd θ_{k-1},    θ_k = θ_{k-1} − lr v_k,

and meta-loss f = outer_loss(θ_{T+1}). The SGD update is linear, so it is differentiated by
hand; only G_k needs autograd. Reverse sweep from a_θ = ∇f(θ_{T+1}), a_v = 0, for k = T+1..1:

    ã = a_v − lr a_θ;   a_φ += (∂G_k/∂φ)ᵀ ã;   a_θ ← a_θ + wd ã + H_kᵀ ã;   a_v ← μ ã

(the θ-part is skipped at k = 1: θ0 does not depend on φ). Costs, in units of one
forward+backward:
- mode "keep": steps 2..T+1 are taken with `create_graph`, and their graphs are kept for the
  reverse sweep, where one double backward gives H_kᵀã and the mixed product together.
  Memory: T graphs at once.
- mode "replay": the forward sweep stores only the iterates; each graph is rebuilt in the
  reverse sweep (one more forward+backward per step); memory: one graph at a time.
- step 1 needs only the mixed product. With a factored objective it is a forward-mode JVP of
  the terms (about half the cost of a double backward); otherwise, or when an op of the model
  has no forward-mode formula (a one-line notice says so), a double backward into φ.
The result equals unrolled differentiation (`unrolled_hypergradient`) in exact arithmetic.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from l2t_dist.bilevel.objective import InnerObjective
from l2t_dist.bilevel.sgd import SGDHyper, sgd_update
from l2t_dist.errors import ConfigError

MODES = ("keep", "replay")
# torch.func.jvp scripts a helper on first use, which warns about torch.jit.script on torch 2.14;
# the warning is torch's own business and would only confuse users of the trainer.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
Loss = Callable[[Sequence[Tensor]], Tensor]
Sync = Callable[[list[Tensor]], None]


def leaves(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Fresh leaf tensors (shared storage, no history) that autograd can differentiate by."""
    return [t.detach().requires_grad_(True) for t in tensors]


def grads_of(loss: Tensor, params: Sequence[Tensor], create_graph: bool = False) -> list[Optional[Tensor]]:
    """∇loss wrt params; None where the loss does not reach a parameter."""
    if not loss.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True))


def _zeros_for_none(ts: Sequence[Optional[Tensor]], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(r) if t is None else t for t, r in zip(ts, like)]


def _synced(ts: Sequence[Optional[Tensor]], like: Sequence[Tensor], sync: Optional[Sync]) -> list[Optional[Tensor]]:
    """`ts` averaged over the ranks (detached copies: a kept graph stays this rank's), or `ts`
    as they are without `sync`. Every entry becomes a tensor, so the buckets match on all ranks."""
    if sync is None:
        return list(ts)
    out = [torch.zeros_like(r) if t is None else t.detach().clone() for t, r in zip(ts, like)]
    sync(out)
    return out


def _vjp(outputs: Sequence[Optional[Tensor]], cotangents: Sequence[Tensor], inputs: Sequence[Tensor],
         retain_graph: bool) -> list[Optional[Tensor]]:
    """Σ_i cotangent_iᵀ ∂output_i/∂inputs, skipping outputs that carry no graph (None or constant)."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None and o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    outs, cots = zip(*pairs)
    return list(torch.autograd.grad(outs, list(inputs), grad_outputs=cots, allow_unused=True,
                                    retain_graph=retain_graph))


def check_lookahead(T: int, mode: str) -> None:
    """The one check of T and the mode (the job schema's bounds say the same for job files)."""
    if not isinstance(T, int) or T < 1:
        raise ConfigError(f"the look-ahead needs T >= 1 matching steps, got T={T!r}")
    if mode not in MODES:
        raise ConfigError(f"unknown hyper-gradient mode {mode!r}; allowed: {', '.join(MODES)}")


def lookahead_loss(params0: Sequence[Tensor], bufs0: Sequence[Tensor], inner: InnerObjective,
                   outer_loss: Loss, T: int, hp: SGDHyper) -> Tensor:
    """The meta-loss alone (no hyper-gradient): for finite differences and diagnostics."""
    check_lookahead(T, "keep")
    theta = [p.detach() for p in params0]
    v = [b.detach().clone() for b in bufs0]
    for k in range(1, T + 2):
        leaf = leaves(theta)
        fn = inner.loss if k <= T else outer_loss
        theta = sgd_update(leaf, v, grads_of(fn(leaf), leaf), hp)
    with torch.no_grad():
        return outer_loss(theta).detach()


def hypergradient(params0: Sequence[Tensor], bufs0: Sequence[Tensor], meta_params: Sequence[Tensor],
                  inner: InnerObjective, outer_loss: Loss, T: int, hp: SGDHyper,
                  mode: str = "keep", timings: Optional[dict] = None,
                  sync: Optional[Sync] = None) -> tuple[Tensor, list[Tensor]]:
    """Meta-loss f(θ_{T+1}) and its exact gradient wrt `meta_params`, through all T+1 steps.

    `params0` and `bufs0` are read, never written: the caller's θ and momentum stay as they
    are (rolling back is free). Parameters that a step's loss does not reach still move by
    weight decay and momentum, and the hyper-gradient accounts for that. `timings`, when
    given, is filled with seconds per phase (benchmarks; it synchronises CUDA).

    `sync` (data parallel, `cluster.meta_sync: global`): averages a list of θ-shaped tensors
    over the ranks, in place. With it every look-ahead gradient and every θ-product of the
    reverse sweep (∇f, H_kᵀã) is averaged, so all ranks walk the global-batch look-ahead;
    the φ-products stay local sums, and the caller averages the returned gradient once. If each
    rank's losses are its shard's mean times n_r·world/N, the result is the one-process
    hyper-gradient on the global batch. None: one process (or per-shard look-aheads).
    """
    check_lookahead(T, mode)
    clock = _Clock(timings, params0)
    keep = mode == "keep"
    weights = inner.weights()
    factored = weights is not None
    # Mixed products are taken wrt the weight tensors (factored) or φ itself (generic).
    side = list(weights) if factored else list(meta_params)
    n = len(params0)

    # Forward sweep.
    theta = [p.detach() for p in params0]
    v = [b.detach().clone() for b in bufs0]
    leaf = leaves(theta)
    theta = sgd_update(leaf, v, _synced(grads_of(inner.loss(leaf), leaf), leaf, sync), hp)
    clock("step1")
    records: list[tuple[list[Tensor], Optional[list]]] = []
    for k in range(2, T + 2):
        leaf = leaves(theta)
        fn = inner.loss if k <= T else outer_loss
        g = grads_of(fn(leaf), leaf, create_graph=keep)
        records.append((leaf, g if keep else None))
        theta = sgd_update(leaf, v, _synced(g, leaf, sync), hp)  # the kept graph is this rank's own
        clock(f"step{k}")
    del v
    leaf = leaves(theta)
    meta_loss = outer_loss(leaf)
    a_theta = _zeros_for_none(_synced(grads_of(meta_loss, leaf), theta, sync), theta)
    meta_loss = meta_loss.detach()
    del leaf, theta
    clock("meta_loss")

    # Reverse sweep over k = T+1 .. 2.
    acc: list[Optional[Tensor]] = [None] * len(side)
    a_v: Optional[list[Tensor]] = None
    for k in range(T + 1, 1, -1):
        leaf, g = records.pop()
        matching = k <= T
        if g is None:  # replay: rebuild this step's graph at the stored iterate
            fn = inner.loss if matching else outer_loss
            g = grads_of(fn(leaf), leaf, create_graph=True)
        adj = _adjoint(a_v, a_theta, hp.lr)
        res = _vjp(g, adj, leaf + (side if matching else []), retain_graph=not factored)
        del g, leaf
        torch._foreach_add_(a_theta, adj, alpha=hp.weight_decay)
        for a, h in zip(a_theta, _synced(res[:n], a_theta, sync)):
            if h is not None:
                a.add_(h)
        a_v = torch._foreach_mul(adj, hp.momentum)
        _accumulate(acc, res[n:])
        clock(f"reverse{k}")

    # k = 1: only the mixed product.
    adj = _adjoint(a_v, a_theta, hp.lr)
    del a_theta, a_v
    dterms = _terms_jvp(inner, params0, adj) if factored else None
    if dterms is not None:
        _accumulate(acc, list(dterms))
        clock("reverse1_jvp")
    else:  # generic objective, or an op without a forward-mode formula: a double backward
        leaf = leaves(params0)
        g = grads_of(inner.loss(leaf), leaf, create_graph=True)
        _accumulate(acc, _vjp(g, adj, side, retain_graph=True))
    grads = _vjp(side, _zeros_for_none(acc, side), meta_params, retain_graph=True) if factored else acc
    clock("reverse1_phi")
    return meta_loss, _zeros_for_none(grads, meta_params)


_noticed_no_jvp = False


def _terms_jvp(inner: InnerObjective, params0: Sequence[Tensor], adj: Sequence[Tensor]) -> Optional[tuple]:
    """JVP of the matching terms along ã (forward mode), or None when an op of the model has no
    forward-mode formula (a custom autograd.Function without jvp, grid_sample, cdist, ...): the
    caller then takes the mixed product by double backward, which is exact too, only slower."""
    global _noticed_no_jvp
    primals = tuple(p.detach() for p in params0)
    try:
        return torch.func.jvp(lambda *p: tuple(inner.terms(list(p))), primals, tuple(adj))[1]
    except (NotImplementedError, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, NotImplementedError) and "setup_context" not in text and "forward AD" not in text:
            raise  # not a missing forward-mode formula
        if not _noticed_no_jvp:
            _noticed_no_jvp = True
            print(f"notice: forward-mode AD is not available for an op of this model ({text.splitlines()[0][:160]}); "
                  "the hyper-gradient's first mixed product uses double backward instead (exact, slower)",
                  file=sys.stderr)
        return None


class _Clock:
    """Phase timer for benchmarks; a no-op unless a dict is given."""

    def __init__(self, out: Optional[dict], like: Sequence[Tensor]):
        self.out = out
        self.cuda = bool(like) and like[0].is_cuda
        self.t = time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.out is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.out[phase] = self.out.get(phase, 0.0) + now - self.t
        self.t = now


def _adjoint(a_v: Optional[list[Tensor]], a_theta: list[Tensor], lr: float) -> list[Tensor]:
    """ã = a_v − lr·a_θ: the total adjoint of v_k (it feeds v_{k+1} and θ_k)."""
    if a_v is None:
        return torch._foreach_mul(a_theta, -lr)
    return torch._foreach_add(a_v, a_theta, alpha=-lr)


def _accumulate(acc: list[Optional[Tensor]], new: Sequence[Optional[Tensor]]) -> None:
    for i, t in enumerate(new):
        if t is not None:
            acc[i] = t.detach() if acc[i] is None else acc[i].add_(t.detach())
