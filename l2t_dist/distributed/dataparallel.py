"""The data-parallel training loop: LocalRun with a shard per rank and averaged gradients.

Semantics (docs/distributed.md):
- every rank builds the same global batch (a pure function of seed, epoch and batch index)
  and takes a contiguous shard of it (sizes differ by at most one image);
- each rank runs the real step and its own look-ahead on its shard; the real-step θ-grads
  and the φ hyper-grads are averaged (weighted by shard size, which is the plain mean for
  equal shards) before the SGD and Adam steps, so all ranks hold identical θ and φ;
- batch norm uses per-worker statistics in training; the running statistics are averaged
  across ranks before evaluation and before every checkpoint;
- val/test are evaluated in contiguous shards, one per rank, and the correct counts summed,
  so the accuracy is the one-process accuracy of the same model;
- rank 0 writes the run directory (checkpoints, metrics log); every rank reports;
- an L2TError that is not `retryable` is raised by every rank at the same point (the NaN
  checks follow the all-reduce; errors of construction and of the callbacks are agreed on
  with `raise_on_all_ranks`) and is then marked `on_all_ranks`: a runner may end the run at
  once without leaving a rank in a collective. Errors that one rank alone sees (a lost
  source actor) are `retryable` and must be raised, so that the group is torn down.

Plain torch.distributed: this runs under Ray Train (distributed/worker.py), torchrun, or a
test harness. Features come from a feeder: the colocated SourceBank, or served Ray actors.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from l2t_dist.config import JobConfig
from l2t_dist.distributed.allreduce import GradAverager, broadcast_, flat_all_reduce_, replica_max_diff
from l2t_dist.errors import ConfigError, L2TError, TrainingError
from l2t_dist.train.data_pipeline import eval_batches
from l2t_dist.train.local import LocalRun

MIN_SHARD = 2  # batch norm needs more than one value per channel, and 1x1 taps exist
REPLICA_TOLERANCE = 1e-5
PROGRESS_EVERY_S = 30.0    # a progress line at least this often (rank 0, not quiet) ...
PROGRESS_FRACTION = 0.1    # ... and every tenth of an epoch


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [lo, hi) of rank's shard of n items; the first n mod world shards get one more."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def raise_on_all_ranks(err: Optional[L2TError], group=None) -> None:
    """Collective: every rank raises the first failing rank's error, or none does. A
    deterministic error on one rank (a checkpoint missing on its node) must neither leave the
    other ranks waiting in the next collective nor be retried."""
    errs: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(errs, err, group=group)
    first = next((e for e in errs if e is not None), None)
    if first is not None:
        first.on_all_ranks = True
        raise first


def _mark_on_all_ranks(err: L2TError) -> None:
    if not err.retryable:
        err.on_all_ranks = True


@torch.no_grad()
def count_correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  device: torch.device) -> int:
    """Correct top-1 predictions (eval mode) on uint8 images, as local.accuracy counts them."""
    from l2t_dist.data import normalize

    was_training = model.training
    model.eval()
    correct = 0
    for xb, yb in eval_batches(x, y, batch_size):
        correct += int((model(normalize(xb).to(device)).argmax(1).cpu() == yb).sum().item())
    model.train(was_training)
    return correct


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
        failure = None
        try:  # data, sources (colocated: loaded here, maybe missing on this node only), model
            super().__init__(job, run_dir, quiet=quiet or rank != 0, callbacks=callbacks, sources=sources)
            if feeder is not None and not hasattr(feeder, "submit"):
                feeder = feeder(self.trainee)  # a factory: it needs the taps that the pairs chose
        except L2TError as err:
            if err.retryable:
                raise
            failure = err
        raise_on_all_ranks(failure, group)
        self.writer = rank == 0
        self.averager = GradAverager(group)
        self.trainee.step.reduce_fn = self.averager
        if feeder is None:
            feeder = ColocatedFeeder(self.trainee.bank)
        else:
            self.trainee.bank = feeder  # pair_report asks the bank for features
        self.feeder = feeder
        self.reporter = reporter
        self.replica_diff = 0.0
        self.timing = {"wait_s": 0.0, "step_s": 0.0, "steps": 0}
        self._pending: dict[int, object] = {}
        self._n_batches = 0
        self._progress: dict = {}
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

    def sharded_accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Top-1 accuracy (%) of the whole split: each rank counts its contiguous shard and the
        counts are summed, so the value is the one-process value (same formula, same model)."""
        if len(y) == 0:
            return float("nan")
        lo, hi = shard_bounds(len(y), self.rank, self.world)
        mine = count_correct(self.trainee.target, x[lo:hi], y[lo:hi], self.job.data.eval_batch_size, self.device)
        total = torch.tensor([mine], dtype=torch.int64, device=self.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return 100.0 * int(total.item()) / len(y)

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

    def run(self) -> dict:
        try:
            return super().run()
        except L2TError as err:  # see the module docstring: every rank raises it here
            _mark_on_all_ranks(err)
            raise

    def restore(self, state: dict) -> None:
        try:
            super().restore(state)
        except L2TError as err:  # every rank restores the same state
            _mark_on_all_ranks(err)
            raise

    def _emit(self, event: str, *args) -> None:
        """Callbacks (say, experiment tracking on rank 0 only) may fail on one rank: agree."""
        failure = None
        try:
            super()._emit(event, *args)
        except L2TError as err:
            if err.retryable:
                raise
            failure = err
        raise_on_all_ranks(failure, self.group)

    def _train_epoch(self, n_batches: int) -> None:
        now = time.perf_counter()
        self._progress = {"start": now, "last": now, "images": 0, "loss": 0.0, "acc": 0.0,
                          "every": max(1, math.ceil(n_batches * PROGRESS_FRACTION)), "n": n_batches}
        super()._train_epoch(n_batches)

    def _progress_line(self, b: int, images: int, m: dict) -> None:
        """Rank 0, not quiet: one line every tenth of an epoch or PROGRESS_EVERY_S seconds.
        The progress bar draws only on a terminal, and a Ray worker's output is a log."""
        p = self._progress
        if self.quiet or not p or sys.stderr.isatty():
            return
        p["images"] += images
        p["loss"] += m["loss"] * images
        p["acc"] += m["acc"] * images
        now = time.perf_counter()
        if b + 1 >= p["n"] or ((b + 1) % p["every"] and now - p["last"] < PROGRESS_EVERY_S):
            return  # the last batch is summed up by the epoch line
        p["last"] = now
        n = max(1, p["images"])
        print(f"[rank0] epoch {self.epoch + 1}/{self.job.optim.epochs} batch {b + 1}/{p['n']} "
              f"loss {p['loss'] / n:.4g} acc {100 * p['acc'] / n:.1f}% "
              f"{p['images'] / max(1e-9, now - p['start']):.0f} img/s", file=sys.stderr, flush=True)

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
        out = dict(zip(keys, vec.tolist()))
        self._trace(x, y, feats, out, b)
        self._progress_line(b, len(yb), out)
        return out

    # ---- LocalRun's evaluation hooks, sharded
    def _before_eval(self) -> None:
        self.average_bn_stats()  # evaluation and best.pt see the same statistics on every rank

    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return self.sharded_accuracy(x, y)

    def _pair_report(self) -> dict:
        return super()._pair_report() if self.writer else {}  # only logged by rank 0

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
