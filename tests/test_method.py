"""L2T-ww's pieces and one training iteration, on a tiny stand-in target network."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_setup import PAIRS, SOURCES, TARGET, TinyTapped
from torch import nn

from l2t_dist.bilevel import SGDHyper, hypergradient, lookahead_loss
from l2t_dist.errors import ConfigError, TrainingError
from l2t_dist.method import (
    REGISTRY,
    L2TStep,
    Method,
    TapInfo,
    TransferObjective,
    TransferStudent,
    WhatNetwork,
    WhereNetwork,
    at_loss,
    attention_map,
    get_method,
    matching_terms,
    pair_weights,
    resize_to,
    resolve_pairs,
    weighted_matching_loss,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def make(method="l2t_ww", seed=0, dtype=torch.float32, where="relu6", beta=0.7, **step_kw):
    torch.manual_seed(seed)
    m = get_method(method)
    pairs = resolve_pairs(PAIRS if m.uses_pairs else "single", SOURCES, TARGET)
    student = TransferStudent(TinyTapped(), m, pairs, source_classes=7 if m.extra_head else None)
    obj = TransferObjective(student, beta=beta, where=where, lwf_source="a" if m.source_logits else None)
    student.to(dtype)
    if obj.meta is not None:
        obj.meta.to(dtype)
    kw = dict(T=2, meta_interval=1)
    kw.update(step_kw)
    return obj, L2TStep(obj, SGDHyper(0.2, 0.9, 0.01), **kw)


def batch(seed=1, dtype=torch.float32, B=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (B,), generator=g)
    feats = {"a": {"a1": torch.randn(B, 3, 8, 8, generator=g, dtype=dtype),
                   "a2": torch.randn(B, 5, 4, 4, generator=g, dtype=dtype),
                   "logits": torch.randn(B, 7, generator=g, dtype=dtype)},
             "b": {"b1": torch.randn(B, 4, 8, 8, generator=g, dtype=dtype)}}
    return x, y, feats


def state(obj, step):
    return ([p.detach().clone() for p in obj.theta_params()] + [b.clone() for b in step.bufs]
            + [b.clone() for b in obj.student.buffers()])


# ---------------------------------------------------------------- pairs
def test_pair_presets():
    single = resolve_pairs("single", SOURCES, TARGET)
    assert [p.name for p in single] == ["a:a2->t1", "b:b1->t0"]
    one = resolve_pairs("one_to_one", SOURCES, TARGET)
    assert [p.name for p in one] == ["a:a1->t0", "a:a2->t1", "b:b1->t0"]
    allp = resolve_pairs("all_to_all", SOURCES, TARGET)
    assert len(allp) == 6 and allp[1].name == "a:a1->t1" and allp[1].resized
    explicit = resolve_pairs(PAIRS, SOURCES, TARGET)
    assert [p.name for p in explicit] == ["a:a1->t0", "a:a1->t1", "a:a2->t1", "b:b1->t0"]
    assert explicit[2].source_channels == 5 and explicit[2].target_channels == 6


def test_pair_errors_are_clear():
    with pytest.raises(ConfigError, match="spatial size 2x2"):
        resolve_pairs("single", {"s": [TapInfo("x", 8, (2, 2))]}, TARGET)
    with pytest.raises(ConfigError, match="unknown pair preset"):
        resolve_pairs("some", SOURCES, TARGET)
    with pytest.raises(ConfigError, match="has no tap 'zz'"):
        resolve_pairs([["a:zz", "t0"]], SOURCES, TARGET)
    with pytest.raises(ConfigError, match="unknown source 'c'"):
        resolve_pairs([["c:a1", "t0"]], SOURCES, TARGET)
    with pytest.raises(ConfigError, match="no target tap 't9'"):
        resolve_pairs([["a:a1", "t9"]], SOURCES, TARGET)
    with pytest.raises(ConfigError, match="listed twice"):
        resolve_pairs([["a:a1", "t0"], ["a:a1", "t0"]], SOURCES, TARGET)


# ---------------------------------------------------------------- nets and losses
def test_what_starts_uniform_and_where_starts_at_one():
    pooled = torch.randn(3, 5)
    assert torch.allclose(WhatNetwork(5)(pooled), torch.full((3, 5), 0.2))
    where = WhereNetwork(5, "relu6")
    assert where.linear.bias.item() == 1.0
    nn.init.zeros_(where.linear.weight)
    assert torch.equal(where(pooled), torch.ones(3))
    assert torch.allclose(WhereNetwork(5, "const")(pooled), torch.full((3,), math.log(2.0)))
    relu = WhereNetwork(5, "relu")
    nn.init.zeros_(relu.linear.weight)
    with torch.no_grad():
        relu.linear.bias.fill_(7.0)
    assert torch.equal(relu(pooled), torch.full((3,), 7.0))
    with pytest.raises(ConfigError, match="where-network"):
        WhereNetwork(5, "sigmoid")


def test_weighted_matching_loss_is_the_paper_formula():
    torch.manual_seed(0)
    B = 3
    t = [torch.randn(B, 4, 8, 8), torch.randn(B, 5, 4, 4)]
    s = [torch.randn(B, 4, 8, 8), torch.randn(B, 5, 8, 8)]   # second pair: source resized 8 -> 4
    lam = [torch.rand(B), torch.rand(B)]
    w = [torch.softmax(torch.randn(B, 4), 1), torch.softmax(torch.randn(B, 5), 1)]
    got = weighted_matching_loss(matching_terms(t, s), [pair_weights(lm, ww) for lm, ww in zip(lam, w)])
    ref = 0.0
    for b in range(B):
        for p in range(2):
            sp = F.interpolate(s[p], size=t[p].shape[-2:], mode="bilinear", align_corners=False)
            d = ((t[p][b] - sp[b]) ** 2).mean((1, 2))
            ref += lam[p][b] * (w[p][b] * d).sum() / B
    assert torch.allclose(got, ref)
    assert torch.equal(resize_to(s[0], (8, 8)), s[0])


@pytest.mark.parametrize("shape", [(8, 8, 32, 32), (32, 32, 2, 2), (7, 5, 3, 11)])
def test_resize_is_bilinear_without_corner_alignment(shape):
    hi, wi, ho, wo = shape
    s = torch.randn(3, 5, hi, wi, dtype=torch.float64)
    ref = F.interpolate(s, size=(ho, wo), mode="bilinear", align_corners=False)
    assert torch.allclose(resize_to(s, (ho, wo)), ref, rtol=0, atol=1e-14)


def test_attention_transfer_loss():
    torch.manual_seed(0)
    t, s = torch.randn(2, 6, 4, 4), torch.randn(2, 3, 8, 8)
    a = attention_map(t)
    assert torch.allclose(a.norm(dim=1), torch.ones(2))
    ref = (attention_map(F.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False)) - a).pow(2).mean()
    assert torch.allclose(at_loss([t], [s]), ref)


def per_pair_transfer(obj, x, feats, lam_w=None):
    """Σ_pairs mean_b λ Σ_c w D, pair by pair from the modules (no grouping), as a reference."""
    _, taps = obj.student.target.forward_taps(x, taps=obj.student.taps, logits=False)
    total = 0.0
    for i, p in enumerate(obj.student.pairs):
        r = obj.student.regressors[i](taps[p.target_tap])
        s = F.interpolate(feats[p.source][p.source_tap], size=r.shape[-2:], mode="bilinear", align_corners=False)
        d = (r - s).pow(2).mean((2, 3))
        if lam_w is None:
            total = total + d.mean()
        else:
            lam, w = lam_w[i]
            total = total + (lam * (w * d).sum(1)).mean()
    return total


# ---------------------------------------------------------------- the methods, one class each
# (needs_sources, single_source, source_logits, extra_head, default_pairs, regressors, meta_networks)
DECLARATIONS = {
    "scratch": (False, False, False, False, None, False, ()),
    "finetune": (False, False, False, False, None, False, ()),   # scratch from target.checkpoint
    "lwf": (True, True, True, True, None, False, ()),
    "at": (True, False, False, False, "one_to_one", False, ()),
    "fm": (True, False, False, False, "single", True, ()),
    "l2t_w": (True, False, False, False, "one_to_one", True, ("what",)),
    "l2t_ww": (True, False, False, False, "all_to_all", True, ("what", "where")),
}


def lam_w_of(obj, feats):
    """λ and w per pair straight from the meta-networks (λ = 1 without where-networks)."""
    out = []
    for i, p in enumerate(obj.student.pairs):
        f = feats[p.source][p.source_tap].mean((2, 3))
        lam = obj.meta.where[i](f) if obj.meta.where is not None else torch.ones(f.shape[0], dtype=f.dtype)
        out.append((lam, obj.meta.what[i](f)))
    return out


def reference_transfer(method, obj, x, feats):
    """Each method's L_transfer from the paper's formulas, pair by pair, without the objective."""
    if method in ("scratch", "finetune"):
        return torch.zeros(())
    if method == "lwf":
        _, taps = obj.student.target.forward_taps(x, taps=[], logits=False, embedding=True)
        teacher = F.softmax(feats["a"]["logits"] / 2, 1)
        log_student = F.log_softmax(obj.student.head(taps["embedding"]) / 2, 1)
        return (teacher * (teacher.log() - log_student)).sum(1).mean() * 4
    if method == "at":
        _, taps = obj.student.target.forward_taps(x, taps=obj.student.taps, logits=False)
        total = 0.0
        for p in obj.student.pairs:
            t = taps[p.target_tap]
            s = F.interpolate(feats[p.source][p.source_tap], size=t.shape[-2:], mode="bilinear", align_corners=False)
            at_t, at_s = (F.normalize(f.pow(2).mean(1).flatten(1), dim=1) for f in (t, s))
            total = total + (at_s - at_t).pow(2).mean()
        return total
    return per_pair_transfer(obj, x, feats, lam_w_of(obj, feats) if obj.meta is not None else None)


@pytest.mark.parametrize("method", sorted(DECLARATIONS))
def test_method_declarations_and_transfer_loss(method):
    m = get_method(method)
    assert m.name == method and type(m) is REGISTRY[method] and get_method(m) is m
    assert (m.needs_sources, m.single_source, m.source_logits, m.extra_head, m.default_pairs, m.regressors,
            m.meta_networks) == DECLARATIONS[method]
    obj, _ = make(method, dtype=torch.float64)
    st = obj.student
    # θ and φ are what the declarations say: a regressor per pair, LwF's head, what/where nets.
    assert len(st.regressors) == (len(st.pairs) if m.regressors else 0)
    assert (st.head is not None) == m.extra_head and (len(st.pairs) > 0) == m.uses_pairs
    assert (obj.meta is not None) == bool(m.meta_networks)
    if obj.meta is not None:
        assert len(obj.meta.what) == len(st.pairs) and (obj.meta.where is not None) == ("where" in m.meta_networks)
        with torch.no_grad():  # move φ off its start so that λ and w vary
            for p in obj.phi_params():
                p.add_(0.3 * torch.randn_like(p))
    if m.uses_pairs and m.regressors:
        assert st.groups == [[0, 3], [1, 2]]  # pairs sharing a target tap run fused
    x, y, feats = batch(dtype=torch.float64)
    loss, parts, logits = obj.real_loss(obj.prepare(x, y, feats))
    ref = reference_transfer(method, obj, x, feats)
    assert torch.allclose(parts["transfer"], ref.to(parts["transfer"]), rtol=1e-12, atol=1e-15)
    assert (parts["transfer"] != 0) == (method not in ("scratch", "finetune"))
    assert torch.equal(parts["ce"], F.cross_entropy(logits, y))
    assert torch.equal(loss, parts["ce"] + 0.7 * parts["transfer"])


def test_registry_lists_the_methods_and_rejects_unknown_names():
    assert list(REGISTRY) == ["scratch", "finetune", "lwf", "at", "fm", "l2t_w", "l2t_ww"]
    assert all(issubclass(c, Method) for c in REGISTRY.values())
    # what the job schema reads: only finetune refuses sources and needs target.checkpoint
    assert [n for n, c in REGISTRY.items() if not c.takes_sources or c.needs_target_checkpoint] == ["finetune"]
    with pytest.raises(ConfigError, match="unknown method 'kd'; allowed: scratch, finetune, lwf, at, fm, l2t_w, "
                                          "l2t_ww"):
        get_method("kd")


def test_a_new_method_is_one_class():
    """The extension contract: declarations plus hooks, nothing else to edit (here Hinton's KD,
    registered for this test only: the target's own logits mimic the source's softmax)."""
    from l2t_dist.method.losses import kd_loss
    from l2t_dist.method.methods import LwF, register

    @register
    class KD(LwF):
        name = "kd_test"
        extra_head = False

        def transfer_loss(self, obj, batch, logits, maps, head):
            return kd_loss(logits, batch.teacher)

    try:
        obj, step = make("kd_test")
        x, y, feats = batch()
        feats["a"]["logits"] = feats["a"]["logits"][:, :5]  # the target's 5 classes
        assert obj.student.head is None and obj.meta is None and obj.student.pairs == []
        _, parts, logits = obj.real_loss(obj.prepare(x, y, feats))
        assert torch.equal(parts["transfer"], kd_loss(logits, F.softmax(feats["a"]["logits"] / 2, 1)))
        assert set(step(x, y, feats)) == {"loss", "ce", "transfer", "acc"}
    finally:
        REGISTRY.pop("kd_test")


def test_the_registry_imports_without_torch():
    """The job schema reads the declarations; `l2t-dist --help` must not pay for torch."""
    import subprocess
    import sys

    code = ("import sys\nfrom l2t_dist.method.methods import get_method\n"
            "assert get_method('l2t_ww').meta_networks == ('what', 'where')\n"
            "assert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("method", ["scratch", "finetune", "fm", "at", "lwf"])
def test_methods_without_meta_params_take_only_the_real_step(method):
    obj, step = make(method)
    assert obj.phi_params() == [] and step.meta_opt is None
    m = step(*batch())
    assert set(m) == {"loss", "ce", "transfer", "acc"}
    assert (m["transfer"] == 0) == (method in ("scratch", "finetune"))
    assert math.isclose(m["loss"], m["ce"] + 0.7 * m["transfer"], rel_tol=1e-5)


def test_needed_taps_and_missing_features():
    obj, step = make()
    assert obj.needed_source_taps() == {"a": ["a1", "a2"], "b": ["b1"]}
    x, y, feats = batch()
    del feats["b"]["b1"]
    with pytest.raises(TrainingError, match="b:b1"):
        step(x, y, feats)


# ---------------------------------------------------------------- the iteration
def test_real_step_equals_torch_sgd():
    obj, step = make()
    ref = copy.deepcopy(obj)
    opt = torch.optim.SGD(ref.theta_params(), lr=0.2, momentum=0.9, weight_decay=0.01)
    for i in range(3):
        x, y, feats = batch(seed=i)
        assert "meta_loss" not in step(x, y, feats, meta=False)
        opt.zero_grad()
        ref.real_loss(ref.prepare(x, y, feats))[0].backward()
        assert all(p.grad is not None for p in ref.theta_params())
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(obj.theta_params(), ref.theta_params()))
    assert all(torch.equal(a, b) for a, b in zip(obj.student.buffers(), ref.student.buffers()))


def test_rollback_restores_theta_momentum_and_bn_stats_exactly():
    obj, step = make(meta_interval=1)
    ref_obj, ref_step = make(meta_interval=1)
    x, y, feats = batch()
    m = step(x, y, feats)
    ref_step(x, y, feats, meta=False)
    assert "meta_loss" in m
    assert all(torch.equal(a, b) for a, b in zip(state(obj, step), state(ref_obj, ref_step)))
    assert any(not torch.equal(a, b) for a, b in zip(obj.phi_params(), ref_obj.phi_params()))


def torch_lookahead_meta_loss(obj, bufs, x, y, feats, T):
    """The meta-loss by the paper's recipe with torch.optim.SGD on a copy of θ: zero (not None)
    grads so every parameter moves, the matching loss pair by pair from the modules (φ fixed)."""
    ref = copy.deepcopy(obj)
    lam_w = [(lam.detach(), w.detach()) for lam, w in lam_w_of(ref, feats)]
    theta = ref.theta_params()
    opt = torch.optim.SGD(theta, lr=0.2, momentum=0.9, weight_decay=0.01)
    for p, buf in zip(theta, bufs):
        p.grad = torch.zeros_like(p)
        opt.state[p]["momentum_buffer"] = buf.clone()
    for k in range(T + 1):
        opt.zero_grad(set_to_none=False)
        loss = (ref.beta * per_pair_transfer(ref, x, feats, lam_w) if k < T
                else F.cross_entropy(ref.student(x, maps=False)[0], y))
        loss.backward()
        opt.step()
    return F.cross_entropy(ref.student(x, maps=False)[0], y).detach()


def test_lookahead_matches_torch_sgd_with_zero_grads():
    """Independent check of the look-ahead semantics: torch.optim.SGD with zero (not None) grads."""
    obj, step = make(dtype=torch.float64)
    x, y, feats = batch(dtype=torch.float64)
    step(x, y, feats, meta=False)
    b = obj.prepare(x, y, feats)
    got = lookahead_loss([p.detach() for p in step.theta], step.bufs, obj.inner(b), obj.task_loss(b), 3, step.hp)
    assert torch.allclose(got, torch_lookahead_meta_loss(obj, step.bufs, x, y, feats, T=3), rtol=1e-12, atol=0)


def test_meta_update_is_adam_on_the_hypergradient():
    obj, step = make(dtype=torch.float64, meta_interval=1)
    ref_obj, ref_step = make(dtype=torch.float64, meta_interval=1)
    x, y, feats = batch(dtype=torch.float64)
    step(x, y, feats)
    ref_step(x, y, feats, meta=False)  # same θ, bufs as `step` after its real step; φ untouched
    b = ref_obj.prepare(x, y, feats)
    _, grads = hypergradient([p.detach() for p in ref_step.theta], ref_step.bufs, ref_step.phi,
                             ref_obj.inner(b), ref_obj.task_loss(b), 2, ref_step.hp)
    lr, wd, b1, b2, eps = 1e-4, 1e-4, 0.9, 0.999, 1e-8
    for p, p0, g in zip(obj.phi_params(), ref_obj.phi_params(), grads):
        g = g + wd * p0.detach()
        m_hat, v_hat = (1 - b1) * g / (1 - b1), (1 - b2) * g * g / (1 - b2)
        assert torch.allclose(p.detach(), p0.detach() - lr * m_hat / (v_hat.sqrt() + eps), rtol=1e-10, atol=1e-15)


def test_meta_interval_and_reduce_fn():
    calls = []
    obj, step = make(meta_interval=3, reduce_fn=lambda gs: calls.append(len(gs)))
    n_theta, n_phi = len(obj.theta_params()), len(obj.phi_params())
    metas, changed = [], []
    for i in range(7):
        before = [p.detach().clone() for p in obj.phi_params()]
        metas.append("meta_loss" in step(*batch(seed=i)))
        changed.append(any(not torch.equal(a, p) for a, p in zip(before, obj.phi_params())))
    assert metas == [True, False, False, True, False, False, True] == changed
    assert calls == [n_theta, n_phi, n_theta, n_theta, n_theta, n_phi, n_theta, n_theta, n_theta, n_phi]


def test_reduce_fn_acts_on_the_real_step_gradients():
    obj, step = make(reduce_fn=lambda gs: [g.mul_(0.0) for g in gs])
    before = [p.detach().clone() for p in obj.theta_params()]
    step(*batch(), meta=False)
    for p, p0 in zip(obj.theta_params(), before):  # zero grads: only weight decay moves θ
        assert torch.allclose(p.detach(), p0 - 0.2 * 0.01 * p0)


def test_non_finite_loss_is_a_training_error():
    obj, step = make()
    x, y, feats = batch()
    feats["a"]["a1"][0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match="non-finite"):
        step(x, y, feats)


def test_non_finite_gradient_stops_before_the_update():
    """A finite loss with a NaN gradient (here put there by the reduce hook) still stops the
    run, with the same message, and neither θ nor the momentum moved."""
    obj, step = make(reduce_fn=lambda gs: gs[-1].view(-1)[0].fill_(float("nan")))
    theta, bufs = [p.detach().clone() for p in obj.theta_params()], [b.clone() for b in step.bufs]
    with pytest.raises(TrainingError, match=r"^non-finite loss or gradient at iteration 0 \(loss [0-9.]+, ce [0-9.]+, "
                                            r"transfer [0-9.]+\); lower the learning rate or beta$"):
        step(*batch(), meta=False)
    assert all(torch.equal(a, b) for a, b in zip(theta, obj.theta_params()))
    assert all(torch.equal(a, b) for a, b in zip(bufs, step.bufs))


def test_state_dict_round_trip_resumes_exactly():
    """Saved after 2 iterations, loaded into a fresh student and step: the next 2 iterations are
    bit for bit those of the uninterrupted run (θ, φ, momentum, BN stats and Adam's moments)."""
    obj, step = make()
    for i in range(2):
        step(*batch(seed=i))
    saved = copy.deepcopy({"student": obj.student.state_dict(), "phi": obj.meta.state_dict(),
                           "step": step.state_dict()})

    def resumed(with_adam=True):
        o, s = make(seed=5)  # other initial weights: everything must come from the saved state
        o.student.load_state_dict(saved["student"])
        o.meta.load_state_dict(saved["phi"])
        s.load_state_dict(saved["step"] if with_adam else dict(saved["step"], meta_opt=None))
        return o, s

    obj2, step2 = resumed()
    assert step2.iteration == 2
    for i in (2, 3):
        assert step(*batch(seed=i)) == step2(*batch(seed=i))
    assert all(torch.equal(a, b) for a, b in zip(state(obj, step), state(obj2, step2)))
    assert all(torch.equal(a, b) for a, b in zip(obj.phi_params(), obj2.phi_params()))
    # Adam's moments matter: without them the same iterations give another φ.
    obj3, step3 = resumed(with_adam=False)
    for i in (2, 3):
        step3(*batch(seed=i))
    assert any(not torch.equal(a, b) for a, b in zip(obj.phi_params(), obj3.phi_params()))


@pytest.mark.parametrize("method,where", [("l2t_ww", "relu6"), ("l2t_ww", "relu"), ("l2t_ww", "const"),
                                          ("l2t_w", "relu6")])
def test_meta_loss_is_the_lookahead_task_loss(method, where):
    """The reported meta-loss: L_org after T torch-SGD matching steps and one task step, taken
    from the state right after the real step, with the λ, w of φ before its update."""
    obj, step = make(method, dtype=torch.float64, where=where)
    ref_obj, ref_step = make(method, dtype=torch.float64, where=where)
    x, y, feats = batch(dtype=torch.float64)
    got = step(x, y, feats)["meta_loss"]
    ref_step(x, y, feats, meta=False)
    want = torch_lookahead_meta_loss(ref_obj, ref_step.bufs, x, y, feats, T=2)
    assert math.isclose(got, float(want), rel_tol=1e-12)
    lams = obj.prepare(x, y, feats).lams
    if method == "l2t_w":  # no where-networks: λ = 1
        assert obj.meta.where is None and all(torch.equal(lm, torch.ones(6, dtype=torch.float64)) for lm in lams)
    else:
        assert len(obj.meta.where) == len(obj.student.pairs) and obj.meta.where[0].kind == where


def test_bad_config_is_reported():
    with pytest.raises(ConfigError, match="unknown method"):
        TransferStudent(TinyTapped(), "kd")
    with pytest.raises(ConfigError, match="needs at least one"):
        TransferStudent(TinyTapped(), "fm", [])
    with pytest.raises(ConfigError, match="number of classes"):
        TransferStudent(TinyTapped(), "lwf")
    with pytest.raises(ConfigError, match="meta_interval"):
        make(meta_interval=0)
