"""The data-parallel training loop: LocalRun with a shard per rank and averaged gradients.

Semantics (docs/distributed.md):
- every rank builds the same global batch (a pure function of seed, epoch and batch index)
  and takes a contiguous shard of it (sizes differ by at most one image);
- each rank runs the real step and its own look-ahead on its shard; the real-step θ-grads
  and the φ hyper-grads are averaged (weighted by shard size, which is the plain mean for
  equal shards) before the SGD and Adam steps, so all ranks hold identical θ and φ;
- batch norm uses per-worker statistics in training; the running statistics are averaged
  across ranks before evaluation and before every checkpoint;
- rank 0 writes the run directory (checkpoints, metrics log); every rank reports.

Plain torch.distributed: this runs under Ray Train (distributed/worker.py), torchrun, or a
test harness. Features come from a feeder: the colocated SourceBank, or served Ray actors.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from l2t_dist.config import JobConfig
from l2t_dist.distributed.allreduce import GradAverager, broadcast_, flat_all_reduce_, replica_max_diff
from l2t_dist.errors import ConfigError, TrainingError
from l2t_dist.train.local import LocalRun

MIN_SHARD = 2  # batch norm needs more than one value per channel, and 1x1 taps exist
REPLICA_TOLERANCE = 1e-5


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [lo, hi) of rank's shard of n items; the first n mod world shards get one more."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class ColocatedFeeder:
    """Sources inside the worker (the SourceBank): nothing to prefetch."""

    prefetch = 0

    def __init__(self, bank):
        self.bank = bank

    def submit(self, x_uint8: torch.Tensor):
        return None

    def collect(self, handle, x: torch.Tensor) -> dict:
        return self.bank.features(x)

    def features(self, x: torch.Tensor) -> dict:
        return self.bank.features(x)


class DataParallelRun(LocalRun):
    """One rank of a data-parallel run. `feeder`: None (colocated sources) or an object with
    submit(x_uint8_shard) -> handle, collect(handle, x) -> features, features(x), prefetch.
    A factory feeder(trainee) is called once the trainee is built (it knows the needed taps).
    `reporter(run, epoch_end)` is called on every rank after every checkpoint (Ray Train)."""

    def __init__(self, job: JobConfig, run_dir: Path, *, rank: int, world: int, group=None,
                 quiet: bool = False, callbacks: Sequence = (), sources: Optional[list] = None,
                 feeder=None, reporter: Optional[Callable] = None):
        if job.data.batch_size < MIN_SHARD * world:
            raise ConfigError(f"data.batch_size={job.data.batch_size} is too small for {world} workers: every "
                              f"worker needs a shard of at least {MIN_SHARD} images; use data.batch_size >= "
                              f"{MIN_SHARD * world} or fewer cluster.workers")
        self.rank, self.world, self.group = rank, world, group
        super().__init__(job, run_dir, quiet=quiet or rank != 0, callbacks=callbacks, sources=sources)
        self.writer = rank == 0
        self.averager = GradAverager(group)
        self.trainee.step.reduce_fn = self.averager
        if feeder is None:
            feeder = ColocatedFeeder(self.trainee.bank)
        else:
            if not hasattr(feeder, "submit"):  # a factory: it needs the taps that the pairs chose
                feeder = feeder(self.trainee)
            self.trainee.bank = feeder  # pair_report asks the bank for features
        self.feeder = feeder
        self.reporter = reporter
        self.replica_diff = 0.0
        self.timing = {"wait_s": 0.0, "step_s": 0.0, "steps": 0}
        self._pending: dict[int, object] = {}
        self._n_batches = 0
        self.sync_replicas()

    # ---- replicas
    def _replicated(self) -> list[torch.Tensor]:
        return list(self.trainee.step.theta) + list(self.trainee.step.phi)

    def _bn_stats(self) -> list[torch.Tensor]:
        return [b for b in self.trainee.objective.student.buffers() if b.is_floating_point()]

    def sync_replicas(self) -> None:
        """Rank 0's θ, φ, momentum and BN statistics everywhere (after build and after restore)."""
        with torch.no_grad():
            broadcast_(self._replicated() + list(self.trainee.step.bufs) + self._bn_stats(), group=self.group)

    def check_replicas(self) -> float:
        diff = replica_max_diff(self._replicated(), group=self.group)
        self.replica_diff = max(self.replica_diff, diff)
        if diff > REPLICA_TOLERANCE:
            raise TrainingError(f"data-parallel replicas diverged: θ/φ differ by up to {diff:.3g} across ranks "
                                f"at step {self.global_step}")
        return diff

    def average_bn_stats(self) -> None:
        flat_all_reduce_(self._bn_stats(), group=self.group)

    # ---- the loop's hooks
    def _batches_per_epoch(self) -> int:
        n = super()._batches_per_epoch()
        total, bs = len(self.data.train_y), self.job.data.batch_size
        last = min(bs, total - (n - 1) * bs)
        if n > 1 and last < MIN_SHARD * self.world:
            n -= 1  # a trailing batch too small to give every worker a shard is skipped
        self._n_batches = n
        return n

    def _batches(self, start: int):
        queue: deque = deque()
        depth = getattr(self.feeder, "prefetch", 0)

        def release():
            b, xb, yb, handle = queue.popleft()
            self._pending = {b: handle}
            return b, xb, yb

        for b, xb, yb in super()._batches(start):
            if b >= self._n_batches:
                break
            lo, hi = shard_bounds(len(yb), self.rank, self.world)
            queue.append((b, xb, yb, self.feeder.submit(xb[lo:hi])))
            while len(queue) > depth:
                yield release()
        while queue:
            yield release()

    def _step(self, b: int, xb: torch.Tensor, yb: torch.Tensor) -> dict:
        from l2t_dist.data import normalize

        started = time.perf_counter()
        lo, hi = shard_bounds(len(yb), self.rank, self.world)
        x_u8 = xb[lo:hi]
        x, y = normalize(x_u8).to(self.device), yb[lo:hi].to(self.device)
        handle = self._pending.pop(b) if b in self._pending else self.feeder.submit(x_u8)
        t0 = time.perf_counter()
        feats = self.feeder.collect(handle, x)
        self.timing["wait_s"] += time.perf_counter() - t0
        share = (hi - lo) / len(yb)
        self.averager.weight = share * self.world
        m = self.trainee.step(x, y, feats)
        keys = sorted(m)
        vec = torch.tensor([m[k] for k in keys], dtype=torch.float64, device=self.device) * share
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=self.group)
        self.timing["step_s"] += time.perf_counter() - started
        self.timing["steps"] += 1
        return dict(zip(keys, vec.tolist()))

    def _end_epoch(self) -> None:
        self.average_bn_stats()  # evaluation and best.pt see the same statistics on every rank
        super()._end_epoch()

    def save(self) -> None:
        self.average_bn_stats()
        self.check_replicas()
        super().save()
        if self.reporter is not None:
            self.reporter(self, self.batch == 0)

    def wait_fraction(self) -> float:
        return self.timing["wait_s"] / max(1e-9, self.timing["step_s"])

    def summary(self) -> dict:
        out = super().summary()
        out.update({"backend": "data_parallel", "workers": self.world, "replica_max_diff": self.replica_diff,
                    "wait_fraction": self.wait_fraction()})
        return out
