"""The generic engine on problems small enough to solve by hand.

SGD semantics against torch.optim.SGD, and the hyper-gradient of a quadratic bilevel problem
against its closed form: every step is linear, so dθ_k/dφ and dv_k/dφ follow a matrix
recurrence that we write out explicitly.
"""

import pytest
import torch

from l2t_dist.bilevel import (
    FactoredObjective,
    FunctionObjective,
    SGDHyper,
    hypergradient,
    lookahead_loss,
    sgd_step_,
    sgd_update,
    unrolled_hypergradient,
    zero_bufs,
)
from l2t_dist.errors import ConfigError

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def test_sgd_step_is_bit_identical_to_torch_sgd():
    torch.manual_seed(0)
    ours = [torch.randn(5, 3), torch.randn(7)]
    ref = [torch.nn.Parameter(p.clone()) for p in ours]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=5e-4)
    bufs, hp = zero_bufs(ours), SGDHyper(0.1, 0.9, 5e-4)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        sgd_step_(ours, bufs, grads, hp)
        assert all(torch.equal(a, b.detach()) for a, b in zip(ours, ref))
        assert all(torch.equal(b, opt.state[p]["momentum_buffer"]) for b, p in zip(bufs, ref))


def test_param_without_grad_still_moves_by_weight_decay_and_momentum():
    p, b = torch.tensor([2.0]), torch.tensor([0.5])
    sgd_step_([p], [b], [None], SGDHyper(0.1, 0.9, 0.01))
    v = 0.9 * 0.5 + 0.01 * 2.0
    assert torch.allclose(b, torch.tensor([v])) and torch.allclose(p, torch.tensor([2.0 - 0.1 * v]))


def test_sgd_update_is_out_of_place():
    p, b = torch.ones(3), torch.zeros(3)
    new = sgd_update([p], [b], [torch.ones(3)], SGDHyper(0.5))
    assert torch.equal(p, torch.ones(3)) and torch.equal(new[0], torch.full((3,), 0.5))
    assert torch.equal(b, torch.ones(3))


def test_bad_hyper_parameters_are_config_errors():
    with pytest.raises(ConfigError):
        SGDHyper(lr=0.0)
    with pytest.raises(ConfigError):
        SGDHyper(lr=0.1, momentum=1.0)
    with pytest.raises(ConfigError, match="T >= 1"):
        hypergradient([], [], [], FunctionObjective(lambda p: 0), lambda p: 0, 0, SGDHyper(0.1))
    with pytest.raises(ConfigError, match="replay"):
        hypergradient([], [], [], FunctionObjective(lambda p: 0), lambda p: 0, 1, SGDHyper(0.1), mode="x")


class Quadratic:
    """z = vec(θ1, θ2); inner ½zᵀAz − (Pᵀφ)ᵀz; outer ½zᵀBz − cᵀz. θ2 is outside the inner loss."""

    def __init__(self, seed=0, n1=6, n2=3, p=4):
        g = torch.Generator().manual_seed(seed)
        n = n1 + n2
        m = torch.randn(n, n, generator=g, dtype=F64)
        self.A = m @ m.T / n + 0.5 * torch.eye(n, dtype=F64)
        self.A[n1:], self.A[:, n1:] = 0, 0
        m = torch.randn(n, n, generator=g, dtype=F64)
        self.B = m @ m.T / n + 0.1 * torch.eye(n, dtype=F64)
        self.c = torch.randn(n, generator=g, dtype=F64)
        self.P = torch.randn(p, n, generator=g, dtype=F64)
        self.P[:, n1:] = 0
        self.phi = torch.randn(p, generator=g, dtype=F64, requires_grad=True)
        self.params0 = [torch.randn(2, 3, generator=g, dtype=F64), torch.randn(n2, generator=g, dtype=F64)]
        self.bufs0 = [torch.randn(t.shape, generator=g, dtype=F64) for t in self.params0]

    @staticmethod
    def z(ps):
        return torch.cat([t.reshape(-1) for t in ps])

    def inner(self):
        return FunctionObjective(lambda ps: 0.5 * self.z(ps) @ self.A @ self.z(ps) - (self.phi @ self.P) @ self.z(ps))

    def outer(self, ps):
        z = self.z(ps)
        return 0.5 * z @ self.B @ z - self.c @ z

    def closed_form(self, T, hp):
        """Forward the linear recurrence together with the Jacobians J_θ = dz/dφ, J_v = dv/dφ."""
        z, v = self.z(self.params0), self.z(self.bufs0)
        n, p = z.numel(), self.phi.numel()
        eye = torch.eye(n, dtype=F64)
        jz, jv = torch.zeros(n, p, dtype=F64), torch.zeros(n, p, dtype=F64)
        phi = self.phi.detach()
        for k in range(T + 1):
            hess, grad = (self.A, self.A @ z - self.P.T @ phi) if k < T else (self.B, self.B @ z - self.c)
            v = hp.momentum * v + grad + hp.weight_decay * z
            jv = hp.momentum * jv + (hess + hp.weight_decay * eye) @ jz - (self.P.T if k < T else 0)
            z, jz = z - hp.lr * v, jz - hp.lr * jv
        return 0.5 * z @ self.B @ z - self.c @ z, jz.T @ (self.B @ z - self.c)


@pytest.mark.parametrize("T", [1, 2, 3, 5])
@pytest.mark.parametrize("mode", ["keep", "replay"])
def test_quadratic_hypergradient_matches_closed_form(T, mode):
    q, hp = Quadratic(seed=T), SGDHyper(0.1, 0.9, 0.01)
    meta_ref, grad_ref = q.closed_form(T, hp)
    meta, (grad,) = hypergradient(q.params0, q.bufs0, [q.phi], q.inner(), q.outer, T, hp, mode=mode)
    assert torch.allclose(meta, meta_ref, rtol=1e-13, atol=0)
    assert torch.allclose(grad, grad_ref, rtol=1e-11, atol=1e-14)
    assert torch.allclose(lookahead_loss(q.params0, q.bufs0, q.inner(), q.outer, T, hp), meta_ref, rtol=1e-13)


def test_inputs_are_never_written():
    q, hp = Quadratic(), SGDHyper(0.1, 0.9, 0.01)
    before = [t.clone() for t in q.params0 + q.bufs0]
    hypergradient(q.params0, q.bufs0, [q.phi], q.inner(), q.outer, 3, hp)
    assert all(torch.equal(a, b) for a, b in zip(before, q.params0 + q.bufs0))


class Factored:
    """A non-quadratic factored objective: Σ softplus(Wφ)_i · terms_i(θ), with terms not reaching θ3."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.phi = [torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True),
                    torch.randn(5, generator=g, dtype=F64, requires_grad=True)]
        self.params0 = [torch.randn(4, 3, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64),
                        torch.randn(2, generator=g, dtype=F64)]
        self.bufs0 = [0.1 * torch.randn(t.shape, generator=g, dtype=F64) for t in self.params0]

    def weights(self):
        return [torch.nn.functional.softplus(self.phi[0]), torch.sigmoid(self.phi[1]).unsqueeze(0).expand(2, 5)]

    @staticmethod
    def terms(ps):
        a, b, _ = ps
        return [torch.cos(a) + a ** 2, torch.stack([torch.tanh(b) ** 2, (b - a[:, 0].sum()) ** 2])]

    def outer(self, ps):
        a, b, c = ps
        return (a.sin().sum() + b.pow(3).sum() * 0.1 + (c * b[:2]).sum()) ** 2 * 0.1

    def factored(self):
        return FactoredObjective(self.terms, self.weights())

    def generic(self):
        return FunctionObjective(lambda ps: sum((w * t).sum() for w, t in zip(self.weights(), self.terms(ps))))


@pytest.mark.parametrize("T", [1, 2, 3])
def test_factored_jvp_route_equals_generic_and_unrolled(T):
    f, hp = Factored(seed=T), SGDHyper(0.05, 0.8, 0.02)
    _, ref = unrolled_hypergradient(f.params0, f.bufs0, f.phi, f.generic(), f.outer, T, hp)
    for mode in ("keep", "replay"):
        for inner in (f.factored(), f.generic()):
            _, got = hypergradient(f.params0, f.bufs0, f.phi, inner, f.outer, T, hp, mode=mode)
            for a, b in zip(got, ref):
                assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
