"""The exact hyper-gradient on a real matching setup, in float64.

A tiny CNN with batch norm and smooth activations (softplus, GELU, average pooling), two
sources, four pairs (one with a resize), what + where networks, momentum and weight decay.
Checked against central finite differences of the meta-loss for every meta-parameter, and
against brute-force unrolled differentiation, for T = 1, 2, 3 and both modes.
"""


import pytest
import torch
from tiny_setup import PAIRS, SOURCES, TARGET, TinyTapped

from l2t_dist.bilevel import SGDHyper, hypergradient, lookahead_loss, unrolled_hypergradient
from l2t_dist.method import L2TStep, TransferObjective, TransferStudent, resolve_pairs

pytestmark = pytest.mark.usefixtures("single_thread")


HP = dict(lr=0.3, momentum=0.9, weight_decay=0.05)


def setup(seed=0, where="relu6"):
    """A student after one real step (so θ0 and the momentum buffers are realistic) and a batch."""
    torch.manual_seed(seed)
    pairs = resolve_pairs(PAIRS, SOURCES, TARGET)
    obj = TransferObjective(TransferStudent(TinyTapped(), "l2t_ww", pairs), beta=1.0, where=where)
    obj.student.double()
    obj.meta.double()
    with torch.no_grad():  # move φ off its start so every meta-parameter matters
        for p in obj.phi_params():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    feats = {"a": {"a1": torch.randn(6, 3, 8, 8, dtype=torch.float64),
                   "a2": torch.randn(6, 5, 4, 4, dtype=torch.float64)},
             "b": {"b1": torch.randn(6, 4, 8, 8, dtype=torch.float64)}}
    step = L2TStep(obj, SGDHyper(**HP), T=1)
    step(x, y, feats, meta=False)
    return obj, step, x, y, feats


def engine_args(obj, step, x, y, feats):
    batch = obj.prepare(x, y, feats)
    return ([p.detach() for p in step.theta], step.bufs, step.phi, obj.inner(batch), obj.task_loss(batch))


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("T", [1, 2, 3])
def test_hypergradient_matches_finite_differences(T):
    obj, step, x, y, feats = setup(seed=T)
    lams = torch.cat(obj.prepare(x, y, feats).lams).detach()
    assert 0.05 < float(lams.min()) and float(lams.max()) < 5.9, "λ must stay off relu6's kinks"
    bn_before = [b.clone() for b in obj.student.buffers()]
    theta0, bufs0, phi, inner, task = engine_args(obj, step, x, y, feats)
    _, grads = hypergradient(theta0, bufs0, phi, inner, task, T, step.hp)
    hp, eps, fd = step.hp, 1e-5, []

    def meta_loss():
        b = obj.prepare(x, y, feats)
        return float(lookahead_loss(theta0, bufs0, obj.inner(b), obj.task_loss(b), T, hp))

    base = meta_loss()
    for p in phi:
        flat_p = p.data.view(-1)
        for i in range(p.numel()):
            v = flat_p[i].item()
            flat_p[i] = v + eps
            up = meta_loss()
            flat_p[i] = v - eps
            down = meta_loss()
            flat_p[i] = v
            fd.append((up - down) / (2 * eps))
    assert meta_loss() == base, "every evaluation must start from the same state"
    assert all(torch.equal(a, b) for a, b in zip(bn_before, obj.student.buffers())), "BN stats leaked"
    fd, g = torch.tensor(fd, dtype=torch.float64), flat(grads)
    rel = float((g - fd).norm() / fd.norm())
    assert rel < 1e-6, f"T={T}: relative error {rel:.3g}"


@pytest.mark.parametrize("mode", ["keep", "replay"])
@pytest.mark.parametrize("T", [1, 2, 3])
def test_hypergradient_equals_unrolled(T, mode):
    obj, step, x, y, feats = setup(seed=10 + T)
    m_ref, g_ref = unrolled_hypergradient(*engine_args(obj, step, x, y, feats), T, step.hp)
    m, g = hypergradient(*engine_args(obj, step, x, y, feats), T, step.hp, mode=mode)
    assert abs(float(m) - float(m_ref)) <= 1e-12 * abs(float(m_ref))
    err = float((flat(g) - flat(g_ref)).abs().max() / flat(g_ref).abs().max())
    assert err < 1e-10, f"T={T} {mode}: {err:.3g}"
