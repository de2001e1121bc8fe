"""One training iteration of every method: the real step, and for L2T the meta-update.

L2T iteration on (x, y) with source features computed once by the caller:
1. real step: SGD on L_org + β·L_transfer (φ constant);
2-4. look-ahead from the new state, exact hyper-gradient (l2t_dist.bilevel), Adam step on φ;
5. roll back: the look-ahead is functional, so θ and the momentum buffers are never touched,
   and the BN running stats are restored by `preserved_buffers` as a guard.
`reduce_fn(list_of_grads)` runs on the real-step θ-grads and on the φ hyper-grads before the
optimizers use them: the distributed trainer all-reduces (averages) there, in place. Every
grad is a tensor (None is turned into zeros first), so buckets line up across ranks.
With `lookahead_sync` (cluster.meta_sync: global) the look-ahead itself is averaged over the
ranks (see `hypergradient`), and every differentiated loss is multiplied by `loss_scale()`
(n_r·world/N: this rank's share of the global batch), so that the ranks' average of anything
differentiated is the global-batch quantity, even through synchronised batch norm.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from l2t_dist.bilevel import ScaledObjective, SGDHyper, check_lookahead, grads_of, hypergradient, sgd_step_, zero_bufs
from l2t_dist.errors import ConfigError, TrainingError
from l2t_dist.method.functional import preserved_buffers
from l2t_dist.method.objective import TransferObjective

ReduceFn = Callable[[list[Tensor]], None]


def _identity(grads: list[Tensor]) -> None:
    return None


def _one() -> float:
    return 1.0


def _norm_sum(grads: list[Tensor], like: Tensor) -> Tensor:
    """Σ‖g‖ in float64 (foreach norms, one stack, one sum); finite iff every entry is, barring overflow."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=like.device)
    return torch.stack(torch._foreach_norm(grads)).double().sum()


def _all_finite(norm_sum: float, grads: list[Tensor]) -> bool:
    # The exact per-tensor check runs only when the cheap one fails (it may have overflowed).
    return math.isfinite(norm_sum) or all(bool(torch.isfinite(g).all()) for g in grads)


def _scaled(loss_fn, scale: float):
    return lambda params: loss_fn(params) * scale


class L2TStep:
    """Owns θ's momentum buffers and φ's Adam; `step(x, y, source_feats)` returns float metrics."""

    def __init__(self, objective: TransferObjective, hp: SGDHyper, T: int = 2, meta_lr: float = 1e-4,
                 meta_weight_decay: float = 1e-4, meta_interval: int = 1, mode: str = "keep",
                 reduce_fn: Optional[ReduceFn] = None, lookahead_sync: Optional[ReduceFn] = None,
                 loss_scale: Optional[Callable[[], float]] = None):
        if meta_interval < 1:
            raise ConfigError(f"meta_interval must be >= 1, got {meta_interval}")
        check_lookahead(T, mode)
        self.objective = objective
        self.hp = hp
        self.T = T
        self.meta_interval = meta_interval
        self.mode = mode
        self.reduce_fn = reduce_fn or _identity
        self.lookahead_sync = lookahead_sync
        self.loss_scale = loss_scale or _one
        self.theta = objective.theta_params()
        self.bufs = zero_bufs(self.theta)
        self.phi = objective.phi_params()
        self.meta_opt = torch.optim.Adam(self.phi, lr=meta_lr, weight_decay=meta_weight_decay) if self.phi else None
        self.iteration = 0
        self.timings: Optional[dict] = None  # set to {} to collect seconds per phase (benchmarks)
        self._spent: list[Tensor] = []   # the last real step's grads, kept until the next backward

    def set_lr(self, lr: float) -> None:
        """The look-ahead uses the current lr too (cosine schedule, set once per epoch)."""
        self.hp.lr = float(lr)

    def step(self, x: Tensor, y: Tensor, source_feats: Mapping[str, Mapping[str, Tensor]],
             meta: Optional[bool] = None) -> dict[str, float]:
        """One iteration. The meta-update runs on iterations 0, k, 2k, ... (k = meta_interval),
        or as `meta` says when given (False: real step only, e.g. a warm-up)."""
        obj = self.objective
        obj.student.train()
        t0 = time.perf_counter()
        batch = obj.prepare(x, y, source_feats)
        metrics = self._real_step(batch)
        self._time("real", t0, x)
        if meta is None:
            meta = self.iteration % self.meta_interval == 0
        if self.meta_opt is not None and meta:
            self._spent = []   # the look-ahead reuses that memory at once
            metrics["meta_loss"] = self._meta_step(batch)
        self.iteration += 1
        return metrics

    __call__ = step

    def _real_step(self, batch) -> dict[str, float]:
        loss, parts, logits = self.objective.real_loss(batch)
        scale = self.loss_scale()
        # The previous grads are freed only now, where torch's zero_grad frees them: freed at the
        # end of a step, their memory went back to the OS and was page-faulted in again by the
        # next forward and backward (twice the page faults of a torch step, 5-10% of a CPU step).
        self._spent = []
        scaled = loss if scale == 1.0 else loss * scale
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads_of(scaled, self.theta), self.theta)]
        # Reduce before checking: in data parallel a rank that raised before the collective
        # would leave the others waiting; a NaN on one rank reaches every rank's grads instead.
        self.reduce_fn(grads)
        with torch.no_grad():  # one device sync for all metrics and the check (stack promotes to float64)
            acc = (logits.argmax(1) == batch.y).double().mean()
            loss_v, ce, tr, acc, norm = torch.stack([loss, parts["ce"], parts["transfer"], acc,
                                                     _norm_sum(grads, loss)]).tolist()
        if not (math.isfinite(loss_v) and _all_finite(norm, grads)):
            raise TrainingError(f"non-finite loss or gradient at iteration {self.iteration} (loss {loss_v:.4g}, "
                                f"ce {ce:.4g}, transfer {tr:.4g}); lower the learning rate or beta")
        sgd_step_(self.theta, self.bufs, grads, self.hp)
        self._spent = grads
        return {"loss": loss_v, "ce": ce, "transfer": tr, "acc": acc}

    def _meta_step(self, batch) -> float:
        obj = self.objective
        inner, outer, scale = obj.inner(batch), obj.task_loss(batch), self.loss_scale()
        if scale != 1.0:
            inner, outer = ScaledObjective(inner, scale), _scaled(outer, scale)
        with preserved_buffers(obj.student):
            meta_loss, grads = hypergradient([p.detach() for p in self.theta], self.bufs, self.phi, inner, outer,
                                             self.T, self.hp, self.mode, timings=self.timings,
                                             sync=self.lookahead_sync)
        t0 = time.perf_counter()
        self.reduce_fn(grads)
        with torch.no_grad():  # one device sync
            value, norm = torch.stack([meta_loss.double() / scale, _norm_sum(grads, meta_loss)]).tolist()
        if not (math.isfinite(value) and _all_finite(norm, grads)):
            raise TrainingError(f"non-finite meta-loss or hyper-gradient at iteration {self.iteration} "
                                f"(meta-loss {value:.4g}); lower the learning rate, beta or T")
        for p, g in zip(self.phi, grads):
            p.grad = g
        self.meta_opt.step()
        for p in self.phi:
            p.grad = None
        self._time("adam", t0, batch.x)
        return value

    def _time(self, phase: str, t0: float, like: Tensor) -> None:
        if self.timings is not None:
            if like.is_cuda:
                torch.cuda.synchronize()
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t0

    def state_dict(self) -> dict:
        """Momentum buffers, Adam state and the iteration counter (θ and φ live in their modules)."""
        return {"bufs": [b.clone() for b in self.bufs], "iteration": self.iteration,
                "meta_opt": self.meta_opt.state_dict() if self.meta_opt is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if len(state["bufs"]) != len(self.bufs):
            raise TrainingError(f"step state has {len(state['bufs'])} momentum buffers, the student {len(self.bufs)}")
        with torch.no_grad():
            for b, s in zip(self.bufs, state["bufs"]):
                b.copy_(s)
        self.iteration = int(state["iteration"])
        if self.meta_opt is not None and state.get("meta_opt") is not None:
            self.meta_opt.load_state_dict(state["meta_opt"])
