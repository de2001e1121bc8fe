"""What a `per_shard` data-parallel run computes, in one process: the reference for its equivalence test.

Written against the method's pieces (objective, SGD step, hyper-gradient), not against
L2TStep, so that it checks the distributed loop rather than repeating it: per iteration, every
shard's real-step gradient is taken at the same θ and the gradients are averaged (weighted by
shard size); then every shard's look-ahead hyper-gradient is taken at the new θ and averaged.
Batch norm: each rank keeps its own running statistics (updated by its shard's real-step
forward), and the run averages them over ranks before evaluating; so does the simulation.
"""

from __future__ import annotations

import torch

from l2t_dist.config import JobConfig
from l2t_dist.train.parallel import shard_bounds


def _weighted_sum(acc, grads, w):
    grads = [g * w for g in grads]
    return grads if acc is None else [a + g for a, g in zip(acc, grads)]


def simulate_data_parallel(job: JobConfig, world: int, iterations: int,
                           device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """θ and φ (by parameter name, as in the student's and the meta-networks' state dicts, on
    the CPU) after `iterations` data-parallel iterations of epoch 0 on `world` ranks, and the
    student's floating-point buffers (BN running statistics) averaged over the ranks. It is
    the `per_shard` algorithm; `global` is checked against one process on the global batch."""
    if world > 1 and job.cluster.meta_sync != "per_shard":
        raise ValueError(f"simulate_data_parallel simulates cluster.meta_sync: per_shard, not "
                         f"{job.cluster.meta_sync!r}; set it in the job (global equals one process: world=1)")
    from l2t_dist.bilevel import grads_of, hypergradient, sgd_step_
    from l2t_dist.data import model_input
    from l2t_dist.method.functional import preserved_buffers
    from l2t_dist.sources.feeder import ColocatedFeeder
    from l2t_dist.train.build import build_trainee
    from l2t_dist.train.data_pipeline import cosine_lr, epoch_batches, prepare_data

    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    torch.set_default_dtype(getattr(torch, job.run.dtype))
    torch.manual_seed(job.run.seed)
    data = prepare_data(job.data)
    dev = torch.device(device)
    tr = build_trainee(job, data.num_classes, dev)
    obj, step = tr.objective, tr.step
    feeder = ColocatedFeeder(tr.sources, tr.requests, dev)
    step.set_lr(cosine_lr(job.optim.lr, 0, job.optim.epochs))
    buffers = dict(obj.student.named_buffers())
    per_rank = [{n: b.clone() for n, b in buffers.items()} for _ in range(world)]  # each rank's own BN stats
    for b, xb, yb in epoch_batches(data.train_x, data.train_y, batch_size=job.data.batch_size,
                                   seed=job.run.seed, epoch=0, augment=job.data.augment):
        if b >= iterations:
            break
        obj.student.train()
        shards = []
        for r in range(world):
            lo, hi = shard_bounds(len(yb), r, world)
            x, feats = model_input(xb[lo:hi], dev), feeder.result(feeder.submit(xb[lo:hi]))
            shards.append((obj.prepare(x, yb[lo:hi].to(dev), feats), (hi - lo) / len(yb)))
        total = None
        for r, (batch, w) in enumerate(shards):  # every shard's gradient at the same θ
            with torch.no_grad():
                for n, buf in buffers.items():
                    buf.copy_(per_rank[r][n])
            loss, _, _ = obj.real_loss(batch)  # updates rank r's running statistics
            per_rank[r] = {n: buf.detach().clone() for n, buf in buffers.items()}
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads_of(loss, step.theta), step.theta)]
            total = _weighted_sum(total, grads, w)
        sgd_step_(step.theta, step.bufs, total, step.hp)
        if step.meta_opt is not None and b % step.meta_interval == 0:
            total = None
            for batch, w in shards:
                with preserved_buffers(obj.student):
                    _, grads = hypergradient([p.detach() for p in step.theta], step.bufs, step.phi,
                                             obj.inner(batch), obj.task_loss(batch), step.T, step.hp, step.mode)
                total = _weighted_sum(total, grads, w)
            for p, g in zip(step.phi, total):
                p.grad = g
            step.meta_opt.step()
            for p in step.phi:
                p.grad = None
    theta = {n: p.detach().cpu().clone() for n, p in obj.student.named_parameters() if p.requires_grad}
    phi = {n: p.detach().cpu().clone() for n, p in obj.meta.named_parameters()} if obj.meta is not None else {}
    # the run's flat_all_reduce_: the sum over ranks, then / world (integer counters agree anyway)
    bn = {n: (torch.stack([per_rank[r][n] for r in range(world)]).sum(0) / world).cpu()
          for n, buf in buffers.items() if buf.is_floating_point()}
    return {"theta": theta, "phi": phi, "buffers": bn}
