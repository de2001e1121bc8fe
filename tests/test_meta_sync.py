"""cluster.meta_sync: global and sync_bn, proved at the engine level under real torch.distributed
(gloo, two processes, float64): two ranks holding unequal shards of a global batch compute the
one-process hyper-gradient of the whole batch, which in turn equals the unrolled reference and
central finite differences. With batch norm on, this holds only with synchronised moments; the
per-shard look-ahead (`per_shard`) differs, which shows that the test can fail."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2t_dist.bilevel import (
    FactoredObjective,
    FunctionObjective,
    ScaledObjective,
    SGDHyper,
    hypergradient,
    lookahead_loss,
    unrolled_hypergradient,
)

N, SPLIT, CLASSES, T = 8, 3, 3, 2   # rank 0 holds images 0..2, rank 1 images 3..7
HP = SGDHyper(lr=0.3, momentum=0.9, weight_decay=1e-3)


def _net(bn: bool) -> nn.Module:
    torch.manual_seed(0)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm(4), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1, stride=2),
                         norm(5), nn.ReLU()).double()


class _Problem:
    """A CNN target with two taps matched to fixed 'source' maps, weighted per (sample, channel)
    by φ (factored), or a generic φ-dependent loss; CE on a linear head for the task loss."""

    def __init__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, src: list, phi: torch.Tensor):
        self.net, self.x, self.y, self.src, self.phi = net, x, y, src, phi
        self.names = [n for n, _ in net.named_parameters()] + ["head.w"]

    def _forward(self, params):
        from torch.func import functional_call

        state = {n: b.clone() for n, b in self.net.named_buffers()}
        state.update(zip(self.names[:-1], params[:-1]))
        feats, h = [], self.x
        for i, m in enumerate(self.net):
            h = functional_call(m, {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".")[0] == str(i)},
                                (h,))
            if i in (2, 5):
                feats.append(h)
        return feats, h.mean((2, 3)) @ params[-1]

    def terms(self, params):
        feats, _ = self._forward(params)
        return [((f - s) ** 2).mean((2, 3)) for f, s in zip(feats, self.src)]

    def weights(self):
        w = torch.softmax(self.phi.view(1, -1) * torch.arange(1.0, 10.0, dtype=torch.float64).view(1, -1)[:, :9], 1)
        rows = (0.5 + self.y.double() / CLASSES).view(-1, 1)  # per sample, wherever it sits
        return [rows * w[:, :4] / len(self.y), rows * w[:, 4:9] / len(self.y)]

    def outer(self, params):
        return F.cross_entropy(self._forward(params)[1], self.y)

    def generic(self, params):  # not factored: φ enters non-linearly
        return sum(((t * torch.tanh(self.phi[:t.shape[1]])).sum(1) ** 2).mean() for t in self.terms(params))


def _data():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    src = [torch.randn(N, 4, 6, 6, generator=g, dtype=torch.float64),
           torch.randn(N, 5, 3, 3, generator=g, dtype=torch.float64)]
    return x, y, src


def _theta(net):
    torch.manual_seed(5)
    return [p.detach().clone() for p in net.parameters()] + [torch.randn(5, CLASSES, dtype=torch.float64) * 0.5]


def _inner(problem: _Problem, factored: bool):
    if factored:
        return FactoredObjective(problem.terms, problem.weights())
    return FunctionObjective(problem.generic)


def _one_process(bn: bool, factored: bool, mode: str):
    x, y, src = _data()
    net = _net(bn).train()
    phi = torch.linspace(-0.4, 0.4, 9, dtype=torch.float64).requires_grad_(True)
    problem = _Problem(net, x, y, src, phi)
    theta = _theta(net)
    bufs = [torch.full_like(t, 0.01) for t in theta]
    loss, grad = hypergradient(theta, bufs, [phi], _inner(problem, factored), problem.outer, T, HP, mode)
    ref = unrolled_hypergradient(theta, bufs, [phi], _inner(problem, factored), problem.outer, T, HP)[1][0]
    return loss, grad[0], ref, (theta, bufs, problem)


def _rank(rank, world, tmp, bn, factored, mode, sync_on, out):
    import torch.distributed as dist

    from l2t_dist.distributed.allreduce import flat_all_reduce_
    from l2t_dist.distributed.sync_bn import sync_batch_norm_

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    x, y, src = _data()
    lo, hi = (0, SPLIT) if rank == 0 else (SPLIT, N)
    net = _net(bn).train()
    if sync_on and bn:
        assert sync_batch_norm_(net) == 2
    phi = torch.linspace(-0.4, 0.4, 9, dtype=torch.float64).requires_grad_(True)
    problem = _Problem(net, x[lo:hi], y[lo:hi], [s[lo:hi] for s in src], phi)
    theta = _theta(net)
    bufs = [torch.full_like(t, 0.01) for t in theta]
    scale = (hi - lo) * world / N
    inner, outer = _inner(problem, factored), problem.outer
    if sync_on:  # as L2TStep does in global mode: scaled losses, plain averages
        inner, outer = ScaledObjective(inner, scale), (lambda p, f=problem.outer: f(p) * scale)
    sent = []

    def average(ts):
        sent.append(sum(t.numel() for t in ts))
        flat_all_reduce_(ts)

    loss, grads = hypergradient(theta, bufs, [phi], inner, outer, T, HP, mode, sync=average if sync_on else None)
    flat_all_reduce_(grads, scale=1.0 if sync_on else scale)  # the caller's reduction of φ's gradient
    if rank == 0:
        torch.save({"grad": grads[0], "sent": sent}, out)
    dist.barrier()  # no rank tears gloo down while the other still uses it (a rank aborted once in CI)
    dist.destroy_process_group()


def _two_ranks(tmp_path, bn, factored, mode, sync_on):
    import torch.multiprocessing as mp

    out = tmp_path / f"r-{bn}-{factored}-{mode}-{sync_on}.pt"
    (tmp_path / "pg").unlink(missing_ok=True)
    mp.spawn(_rank, args=(2, str(tmp_path), bn, factored, mode, sync_on, str(out)), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.parametrize("bn,factored,mode", [(True, True, "keep"), (True, False, "replay"), (False, True, "keep")])
def test_global_meta_sync_equals_one_process_on_the_global_batch(tmp_path, bn, factored, mode):
    _, one, unrolled, _ = _one_process(bn, factored, mode)
    torch.testing.assert_close(one, unrolled, rtol=1e-9, atol=1e-12)  # the reference itself is exact
    got = _two_ranks(tmp_path, bn, factored, mode, sync_on=True)
    torch.testing.assert_close(got["grad"], one, rtol=1e-9, atol=1e-12)
    n_theta = sum(t.numel() for t in _theta(_net(bn)))
    assert got["sent"] == [n_theta] * (2 * T + 2)  # T+1 look-ahead gradients, ∇f, T reverse products


def test_global_meta_sync_matches_finite_differences_with_synchronised_bn(tmp_path):
    _, _, _, (theta, bufs, problem) = _one_process(True, True, "keep")
    got = _two_ranks(tmp_path, True, True, "keep", sync_on=True)["grad"]
    phi, eps = problem.phi, 1e-6
    for i in (0, 4, 8):
        def f(delta, i=i):
            with torch.no_grad():
                phi[i] += delta
            value = lookahead_loss(theta, bufs, _inner(problem, True), problem.outer, T, HP)
            with torch.no_grad():
                phi[i] -= delta
            return value
        fd = (f(eps) - f(-eps)) / (2 * eps)
        assert abs(float(fd) - float(got[i])) <= 1e-6 * max(1.0, abs(float(fd))), (i, float(fd), float(got[i]))


def test_per_shard_look_ahead_and_unsynchronised_bn_differ_from_one_process(tmp_path):
    _, one, _, _ = _one_process(True, True, "keep")
    per_shard = _two_ranks(tmp_path, True, True, "keep", sync_on=False)["grad"]
    assert (per_shard - one).abs().max() > 1e-4  # a different algorithm, not a rounding difference


def test_sync_bn_converts_torch_batch_norm_and_refuses_one_with_its_own_forward():
    from timm.layers import BatchNormAct2d

    from l2t_dist.config import parse_job
    from l2t_dist.distributed.sync_bn import MomentSyncBatchNorm, sync_batch_norm_
    from l2t_dist.errors import ConfigError
    from l2t_dist.validate import check_job

    net = _net(True)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert sync_batch_norm_(net) == 2 and sync_batch_norm_(net) == 0  # converted once, in place
    assert all(isinstance(net[i], MomentSyncBatchNorm) for i in (1, 4))
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())  # same keys and values
    with pytest.raises(ConfigError, match=r"layer '1' is a timm.*BatchNormAct2d.*cluster.sync_bn: false"):
        sync_batch_norm_(nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4)))
    # `l2t-dist job` (and the Ray driver) says so before any worker starts
    with pytest.raises(ConfigError, match="BatchNormAct2d"):
        check_job(parse_job({"method": {"name": "scratch"}, "target": {"arch": "timm:efficientnet_b0"},
                             "cluster": {"meta_sync": "global", "sync_bn": True}}))
    # the default (null) synchronises when it can, and never refuses a network
    check_job(parse_job({"method": {"name": "scratch"}, "target": {"arch": "timm:efficientnet_b0"}}))


def test_default_sync_bn_synchronises_torch_batch_norm_under_global_meta_sync_only():
    """cluster.sync_bn null: the global batch's moments whenever they can be had (meta_sync
    global, torch BN layers), so that N workers equal one process by default; per-worker
    statistics for per_shard and for BN layers with a forward of their own."""
    from timm.layers import BatchNormAct2d

    from l2t_dist.config import parse_job
    from l2t_dist.distributed.sync_bn import MomentSyncBatchNorm, resolve_sync_bn
    from l2t_dist.train.parallel import DataParallel

    assert parse_job({"method": {"name": "scratch"}}).cluster.sync_bn is None
    timm_bn = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4))
    assert resolve_sync_bn(None, "global", _net(True)) is True
    assert resolve_sync_bn(None, "global", _net(False)) is True  # nothing to convert, nothing lost
    assert resolve_sync_bn(None, "per_shard", _net(True)) is False
    assert resolve_sync_bn(None, "global", timm_bn) is False
    assert resolve_sync_bn(False, "global", _net(True)) is False
    # the strategy applies it to the student (no communication until a forward)
    for meta_sync, synced in (("global", True), ("per_shard", False)):
        net, par = _net(True), DataParallel(0, 2, meta_sync=meta_sync)
        par.prepare_model(net)
        assert par.sync_bn is synced and isinstance(net[1], MomentSyncBatchNorm) is synced
    par = DataParallel(0, 2)
    par.prepare_model(timm_bn)
    assert par.sync_bn is False and type(timm_bn[1]) is BatchNormAct2d
