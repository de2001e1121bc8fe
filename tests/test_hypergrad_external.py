"""The exact hyper-gradient on library networks (a torchvision and a timm ResNet), in float64.

The targets are the real library models, built by `build_model("tv:...")` / `("timm:...")`
with their taps in three stages and batch norm in training mode. Finite differences need a
smooth function (they fail across ReLU and max-pool kinks, docs: ENV.md), so for them every
ReLU becomes a softplus and the max-pool an average pool; the unmodified networks are checked
against brute-force unrolled differentiation instead. Also: the engine's fallback when an op
has no forward-mode formula (double backward for the first mixed product, one notice).
"""

import pytest
import torch
import torch.nn.functional as F
from tiny_setup import PAIRS, SOURCES, TARGET, TinyTapped
from torch import nn

from l2t_dist.bilevel import SGDHyper, hypergradient, lookahead_loss, unrolled_hypergradient
from l2t_dist.bilevel import hypergrad as engine
from l2t_dist.method import L2TStep, TapInfo, TransferObjective, TransferStudent, resolve_pairs, tap_infos
from l2t_dist.models import build_model

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
HP = dict(lr=0.1, momentum=0.9, weight_decay=0.05)
TAPS = ["layer1", "layer2", "layer3"]  # 8x8, 4x4, 2x2 at 32x32 in both ResNets
B = 4


def smooth(model: nn.Module) -> nn.Module:
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.ReLU):
            model.set_submodule(name, nn.Softplus(beta=2.0))
        elif isinstance(m, nn.MaxPool2d):
            model.set_submodule(name, nn.AvgPool2d(3, 2, 1))
    return model


def setup(target: nn.Module, seed: int):
    """Two sources (random maps), four pairs over three target stages (one with a resize),
    what + where networks moved off their start, θ and momentum after one real step."""
    torch.manual_seed(seed)
    shapes = {n: (h, w) for n, _, h, w in target.tap_shapes(32)}
    sources = {"a": [TapInfo("a1", 3, shapes[TAPS[0]]), TapInfo("a2", 5, shapes[TAPS[1]])],
               "b": [TapInfo("b1", 4, shapes[TAPS[2]])]}
    pairs = resolve_pairs([["a:a1", TAPS[0]], ["a:a1", TAPS[1]], ["a:a2", TAPS[1]], ["b:b1", TAPS[2]]],
                          sources, [t for t in tap_infos(target.tap_shapes(32)) if t.name in TAPS])
    obj = TransferObjective(TransferStudent(target, "l2t_ww", pairs), beta=1.0, where="relu6")
    obj.student.double()
    obj.meta.double()
    with torch.no_grad():
        for p in obj.phi_params():
            p.add_(0.2 * torch.randn_like(p))
    x, y = torch.randn(B, 3, 32, 32, dtype=F64), torch.randint(0, 5, (B,))
    feats = {s: {t.name: torch.randn(B, t.channels, *t.size, dtype=F64) for t in infos} for s, infos in sources.items()}
    step = L2TStep(obj, SGDHyper(**HP), T=1)
    step(x, y, feats, meta=False)
    return obj, step, x, y, feats


def engine_args(obj, step, x, y, feats):
    batch = obj.prepare(x, y, feats)
    return [p.detach() for p in step.theta], step.bufs, step.phi, obj.inner(batch), obj.task_loss(batch)


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


ARCHS = [("tv:resnet18", 0), ("timm:resnet10t", 3)]


@pytest.mark.parametrize("arch, seed", ARCHS)
def test_hypergradient_matches_finite_differences(arch, seed):
    torch.manual_seed(seed)  # the target's initialisation too, not whatever earlier tests left in the RNG
    obj, step, x, y, feats = setup(smooth(build_model(arch, 5)), seed)
    batch = obj.prepare(x, y, feats)
    lams = torch.cat(batch.lams).detach()
    assert 0.05 < float(lams.min()) and float(lams.max()) < 5.9, "λ must stay off relu6's kinks"
    assert all(m.training for m in obj.student.target.modules() if isinstance(m, nn.BatchNorm2d))
    theta0, bufs0, phi, inner, task = engine_args(obj, step, x, y, feats)
    _, grads = hypergradient(theta0, bufs0, phi, inner, task, 1, step.hp)
    g = flat(grads)

    def meta_loss():
        b = obj.prepare(x, y, feats)
        return float(lookahead_loss(theta0, bufs0, obj.inner(b), obj.task_loss(b), 1, step.hp))

    # Central differences along random unit directions in φ (the what/where nets of four pairs);
    # their truncation error falls as eps² (measured: 1.4e-5 at eps 1e-5 on tv:resnet18, 1e-7 at 1e-6).
    gen, eps, fd, an = torch.Generator().manual_seed(seed), 1e-6, [], []
    base = meta_loss()
    for _ in range(3):
        d = torch.randn(g.numel(), generator=gen, dtype=F64)
        d = list(torch.split(d / d.norm(), [p.numel() for p in phi]))
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, c in zip(phi, d):
                    p.add_(sign * eps * c.view_as(p))
            values.append(meta_loss())
            with torch.no_grad():
                for p, c in zip(phi, d):
                    p.sub_(sign * eps * c.view_as(p))
        fd.append((values[0] - values[1]) / (2 * eps))
        an.append(float(g @ flat(d)))
    assert meta_loss() == pytest.approx(base, rel=1e-14), "every evaluation must start from the same state"
    fd, an = torch.tensor(fd, dtype=F64), torch.tensor(an, dtype=F64)
    assert float(fd.abs().min()) > 1e-8, "the directional derivatives must not vanish"
    rel = float((an - fd).norm() / fd.norm())
    assert rel < 1e-6, f"{arch}: relative error {rel:.3g}"


@pytest.mark.parametrize("arch, seed", ARCHS)
def test_hypergradient_equals_unrolled_on_the_unmodified_network(arch, seed):
    """ReLU and max-pool kinks as the library builds them: exact against plain autograd."""
    obj, step, x, y, feats = setup(build_model(arch, 5), seed)
    assert any(isinstance(m, nn.ReLU) for m in obj.student.modules())
    m_ref, g_ref = unrolled_hypergradient(*engine_args(obj, step, x, y, feats), 1, step.hp)
    m, g = hypergradient(*engine_args(obj, step, x, y, feats), 1, step.hp)
    assert abs(float(m) - float(m_ref)) <= 1e-12 * abs(float(m_ref))
    err = float((flat(g) - flat(g_ref)).abs().max() / flat(g_ref).abs().max())
    assert err < 1e-10, f"{arch}: {err:.3g}"


# ----- ops without a forward-mode formula -------------------------------------------------

class SmoothNoJvp(torch.autograd.Function):
    """x·sigmoid(x) with a backward (differentiable, so double backward works) and no jvp."""

    @staticmethod
    def forward(x):
        return x * torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * (s + x * s * (1 - s))


class CustomOp(nn.Module):
    def forward(self, x):
        return SmoothNoJvp.apply(x)


class GridSampleOp(nn.Module):
    """A fixed smooth warp: grid_sample has a double backward but no forward-mode formula."""

    def forward(self, x):
        theta = torch.tensor([[0.9, 0.1, 0.05], [-0.1, 0.95, 0.0]], dtype=x.dtype).expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def tiny_with(op: nn.Module, seed: int = 0):
    torch.manual_seed(seed)
    target = TinyTapped()
    target.stage0 = nn.Sequential(target.stage0[0], target.stage0[1], op)
    obj = TransferObjective(TransferStudent(target, "l2t_ww", resolve_pairs(PAIRS, SOURCES, TARGET)),
                            beta=1.0, where="relu6")
    obj.student.double()
    obj.meta.double()
    with torch.no_grad():
        for p in obj.phi_params():
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randn(6, 3, 8, 8, dtype=F64), torch.randint(0, 5, (6,))
    feats = {"a": {"a1": torch.randn(6, 3, 8, 8, dtype=F64), "a2": torch.randn(6, 5, 4, 4, dtype=F64)},
             "b": {"b1": torch.randn(6, 4, 8, 8, dtype=F64)}}
    step = L2TStep(obj, SGDHyper(lr=0.3, momentum=0.9, weight_decay=0.05), T=1)
    step(x, y, feats, meta=False)
    return obj, step, x, y, feats


@pytest.mark.parametrize("op", [CustomOp(), GridSampleOp()], ids=["custom_function", "grid_sample"])
@pytest.mark.parametrize("T", [1, 2])
def test_no_forward_ad_falls_back_to_double_backward(op, T, capsys, monkeypatch):
    monkeypatch.setattr(engine, "_noticed_no_jvp", False)
    obj, step, x, y, feats = tiny_with(op)
    theta0, bufs0, phi, inner, task = engine_args(obj, step, x, y, feats)
    primals = tuple(theta0)
    with pytest.raises((NotImplementedError, RuntimeError)):  # the op really has no forward-mode formula
        torch.func.jvp(lambda *p: tuple(inner.terms(list(p))), primals, tuple(torch.ones_like(t) for t in primals))
    _, g_ref = unrolled_hypergradient(*engine_args(obj, step, x, y, feats), T, step.hp)
    for mode in ("keep", "replay"):
        _, g = hypergradient(*engine_args(obj, step, x, y, feats), T, step.hp, mode=mode)
        err = float((flat(g) - flat(g_ref)).abs().max() / flat(g_ref).abs().max())
        assert err < 1e-10, f"{mode}: {err:.3g}"
    notices = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("notice:")]
    assert len(notices) == 1, notices  # once per process, not once per iteration
    assert "forward-mode AD" in notices[0] and "double backward" in notices[0]


def test_only_missing_forward_formulas_are_caught(monkeypatch):
    """Any other error inside the forward-mode pass is a real failure and surfaces as is."""
    from l2t_dist.bilevel import FactoredObjective

    monkeypatch.setattr(engine, "_noticed_no_jvp", True)
    params, adj = [torch.ones(3, dtype=F64)], [torch.ones(3, dtype=F64)]

    def raising(exc):
        def terms(ps):
            raise exc
        return FactoredObjective(terms, [torch.ones(3, dtype=F64)])

    with pytest.raises(RuntimeError, match="a real bug"):
        engine._terms_jvp(raising(RuntimeError("a real bug in the model")), params, adj)
    assert engine._terms_jvp(raising(NotImplementedError("no jvp")), params, adj) is None
    ok = FactoredObjective(lambda ps: [ps[0] ** 2], [torch.ones(3, dtype=F64)])
    torch.testing.assert_close(engine._terms_jvp(ok, params, adj)[0], 2 * torch.ones(3, dtype=F64))
