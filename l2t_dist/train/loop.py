"""The one training loop: restore -> for each epoch: steps, evaluate, save.

It is handed its parts rather than subclassed: a parallel strategy (train/parallel.py: the
world of one, or data-parallel ranks), a feature feeder (sources/feeder.py: colocated or
served, one protocol), the data (train/data_pipeline.py: a TaskPipeline, in memory or
streamed) and callbacks (experiment tracking, Ray Train reporting), each of which may define
on_start(loop), on_epoch_end(loop, record), on_checkpoint(loop, epoch_end), on_end(loop,
summary). It runs with neither Ray nor MLflow installed (the GPU boxes have neither). Rank 0
(the writer) fills the run directory: metrics.jsonl, last.pt, best.pt.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from l2t_dist.config import JobConfig
from l2t_dist.errors import L2TError, TrainingError
from l2t_dist.sources.feeder import ColocatedFeeder, Feeder, Shard, prefetched
from l2t_dist.train.build import Trainee, build_trainee, pick_device
from l2t_dist.train.data_pipeline import TaskPipeline, batches_per_epoch, cosine_lr, eval_batches, open_data
from l2t_dist.train.metrics import JsonlLog, Progress, ProgressLines
from l2t_dist.train.parallel import MIN_SHARD, SingleProcess, check_batch_size
from l2t_dist.train.run_dir import BEST, LAST, METRICS
from l2t_dist.train.state import RunSummary, TrainingState, rng_state, set_rng_state

REPLICA_TOLERANCE = 1e-5
PAIR_REPORT_IMAGES = 256  # the λ and entropy per pair are averaged over this many val images

FeederFactory = Callable[[Trainee], Feeder]


def count_correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  device: torch.device) -> int:
    """Correct top-1 predictions (eval mode) on uint8 images."""
    return count_correct_in(model, eval_batches(x, y, batch_size), device)


@torch.no_grad()
def count_correct_in(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device) -> int:
    """Correct top-1 predictions (eval mode) over batches of uint8 images and labels."""
    from l2t_dist.data import model_input

    was_training = model.training
    model.eval()
    correct = 0
    for xb, yb in batches:
        correct += int((model(model_input(xb, device)).argmax(1).cpu() == yb).sum().item())
    model.train(was_training)
    return correct


@torch.no_grad()
def pair_report(trainee: Trainee, feeder: Feeder, x: torch.Tensor, y: torch.Tensor,
                device: torch.device) -> dict[str, dict]:
    """Mean λ and channel-weight entropy per pair on val images: what the meta-networks chose."""
    from l2t_dist.data import model_input

    obj = trainee.objective
    if obj.meta is None or len(y) == 0:
        return {}
    xb = x[:PAIR_REPORT_IMAGES]
    feats = feeder.result(feeder.submit(xb))
    batch = obj.prepare(model_input(xb, device), y[:PAIR_REPORT_IMAGES].to(device), feats)
    report = {}
    for i, pair in enumerate(trainee.pairs):
        w = obj.meta.what[i](batch.raw_sources[i].mean((2, 3)))
        entropy = float(-(w * w.clamp_min(1e-12).log()).sum(1).mean())
        report[pair.name] = {"lambda": float(batch.lams[i].mean()), "entropy": entropy}
    return report


class TrainingLoop:
    """One run (one rank of it): its state, and the loop over it. `run()` returns a RunSummary.

    `sources`: pre-built LoadedSources, or a factory called where they would be loaded, so
    that the target's initialisation sees the same RNG state (served mode builds skeletons).
    `feeder`: a factory feeder(trainee) (it needs the taps that the pairs chose); default: the
    sources run in this process. `data`: the task's TaskPipeline; default: open_data(job.data)."""

    def __init__(self, job: JobConfig, run_dir: Path, *, parallel=None,
                 sources: Union[None, list, Callable[[], list]] = None, feeder: Optional[FeederFactory] = None,
                 data: Optional[TaskPipeline] = None, callbacks: Sequence = (), quiet: bool = False):
        self.job, self.run_dir = job, Path(run_dir)
        self.parallel = parallel or SingleProcess()
        self.quiet = quiet or not self.parallel.is_writer
        self.callbacks = list(callbacks)
        failure = None
        try:  # data, sources (colocated: loaded here, maybe missing on this node only), model
            check_batch_size(job.data.batch_size, self.parallel.world)
            self._build(sources, feeder, data)
        except L2TError as err:
            if err.retryable:
                raise
            failure = err
        self.parallel.agree(failure)
        self.log = JsonlLog(self.run_dir / METRICS)
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.best = {"val_acc": -1.0, "test_acc": None, "epoch": None}
        self.history: list[dict] = []
        self.sums: dict = {}  # running sums of the epoch in progress (saved: a resume mid-epoch is exact)
        self.replica_diff = 0.0
        self.timing = {"wait_s": 0.0, "step_s": 0.0, "steps": 0}
        self._epoch_train: dict = {}
        self._sync_replicas()

    def _build(self, sources, feeder: Optional[FeederFactory], data: Optional[TaskPipeline]) -> None:
        job = self.job
        if job.run.threads:
            torch.set_num_threads(job.run.threads)
        torch.set_default_dtype(getattr(torch, job.run.dtype))
        self.device = pick_device(job.run.device)
        torch.manual_seed(job.run.seed)
        self.data: TaskPipeline = open_data(job.data) if data is None else data
        self.trainee = build_trainee(job, self.data.num_classes, self.device,
                                     sources=sources() if callable(sources) else sources,
                                     parallel=self.parallel)
        t = self.trainee
        self.feeder = feeder(t) if feeder is not None else ColocatedFeeder(t.sources, t.requests, self.device)

    @property
    def writer(self) -> bool:
        return self.parallel.is_writer

    # ---- replicas
    def _replicated(self) -> list[torch.Tensor]:
        return list(self.trainee.step.theta) + list(self.trainee.step.phi)

    def _bn_stats(self) -> list[torch.Tensor]:
        return [b for b in self.trainee.objective.student.buffers() if b.is_floating_point()]

    def _sync_replicas(self) -> None:
        """Rank 0's θ, φ, momentum and BN statistics everywhere (after build and after restore)."""
        self.parallel.broadcast(self._replicated() + list(self.trainee.step.bufs) + self._bn_stats())

    def _check_replicas(self) -> None:
        diff = self.parallel.replica_diff(self._replicated())
        self.replica_diff = max(self.replica_diff, diff)
        if diff > REPLICA_TOLERANCE:
            raise TrainingError(f"data-parallel replicas diverged: θ/φ differ by up to {diff:.3g} across ranks "
                                f"at step {self.global_step}")

    # ---- state
    def state(self) -> TrainingState:
        t = self.trainee
        return TrainingState(
            job=self.job.model_dump(mode="json"), arch=self.job.target.arch, num_classes=self.data.num_classes,
            target=t.target.state_dict(), student=t.objective.student.state_dict(),
            phi=t.objective.meta.state_dict() if t.objective.meta is not None else None, step=t.step.state_dict(),
            epoch=self.epoch, batch=self.batch, global_step=self.global_step, best=dict(self.best),
            history=list(self.history), sums=dict(self.sums), rng=rng_state())

    def restore(self, state: TrainingState) -> None:
        t = self.trainee
        t.objective.student.load_state_dict(state.student)
        if state.phi is not None:
            t.objective.meta.load_state_dict(state.phi)
        t.step.load_state_dict(state.step)
        self.epoch, self.batch, self.global_step = state.epoch, state.batch, state.global_step
        self.best, self.history, self.sums = dict(state.best), list(state.history), dict(state.sums)
        set_rng_state(state.rng)
        if self.writer:
            self.log.truncate_after(self.epoch, self.global_step)
            if self.job.run.trace:
                from l2t_dist.train.trace import trace_log

                trace_log(self.run_dir).truncate_after(self.epoch, self.global_step)
        self._sync_replicas()

    def save(self) -> None:
        """Checkpoint last.pt (the writer), after making the replicas' statistics agree."""
        self.parallel.average_buffers(self._bn_stats())
        self._check_replicas()
        if self.writer:
            self.state().save(self.run_dir / LAST)
        self._emit("on_checkpoint", self.batch == 0)

    # ---- the loop
    def run(self, state: Optional[TrainingState] = None) -> RunSummary:
        try:
            if state is not None:
                self.restore(state)
            n_batches = self.batches_per_epoch()
            self._emit("on_start")
            while self.epoch < self.job.optim.epochs:
                self._train_epoch(n_batches)
                self._end_epoch()
            summary = self.summary()
            self._emit("on_end", summary)
            return summary
        except L2TError as err:  # every rank raises it here, at the same point
            raise self.parallel.agreed(err) from None

    def batches_per_epoch(self) -> int:
        job = self.job
        total, bs = self.data.sizes()["train"], job.data.batch_size
        n = batches_per_epoch(total, bs)
        if job.run.max_iters_per_epoch:
            n = min(n, job.run.max_iters_per_epoch)
        last = min(bs, total - (n - 1) * bs)
        if n > 1 and last < MIN_SHARD * self.parallel.world:
            n -= 1  # a trailing batch too small to give every worker a shard is skipped
        return n

    def _emit(self, event: str, *args) -> None:
        """Callbacks may fail on one rank only (tracking runs on rank 0): the ranks agree."""
        failure = None
        try:
            for cb in self.callbacks:
                fn = getattr(cb, event, None)
                if fn is not None:
                    fn(self, *args)
        except L2TError as err:
            if err.retryable:
                raise
            failure = err
        self.parallel.agree(failure)

    def _shards(self, n_batches: int):
        """This rank's shards of the epoch's global batches, from batch self.batch on."""
        shards = self.data.train_shards(self.job.run.seed, self.epoch, self.batch, n_batches, self.parallel.shard)
        return prefetched(shards, self.feeder)

    def _train_epoch(self, n_batches: int) -> None:
        job, t = self.job, self.trainee
        t.step.set_lr(cosine_lr(job.optim.lr, self.epoch, job.optim.epochs))
        desc = f"epoch {self.epoch + 1}/{job.optim.epochs}"
        bar = Progress(n_batches - self.batch, desc, quiet=self.quiet)
        lines = ProgressLines(n_batches, desc, quiet=self.quiet or self.parallel.world == 1)
        if self.batch == 0:
            self.sums = {"loss": 0.0, "ce": 0.0, "acc": 0.0, "n": 0}
        sums = self.sums
        started = time.perf_counter()
        images = 0
        with contextlib.closing(self._shards(n_batches)) as shards:  # no decode worker outlives the epoch
            for shard in shards:
                try:
                    m = self._step(shard)
                except TrainingError as err:
                    if err.retryable:
                        raise
                    raise self._stopped(err, shard) from None
                n = shard.global_size
                self.batch, self.global_step = shard.index + 1, self.global_step + 1
                images += n
                for k in ("loss", "ce", "acc"):
                    sums[k] += m[k] * n
                sums["n"] += n
                bar.update(n, loss=m["loss"], acc=100 * m["acc"])
                lines.update(shard.index, n, m)
                if job.run.checkpoint_every and self.global_step % job.run.checkpoint_every == 0:
                    self.save()
        self._epoch_train = {k: sums[k] / max(1, sums["n"]) for k in ("loss", "ce", "acc")}
        self._epoch_train["images_per_s"] = images / max(1e-9, time.perf_counter() - started)

    def _stopped(self, err: TrainingError, shard: Shard) -> TrainingError:
        kept = (f"the last good checkpoint is kept at {self.run_dir / LAST}" if (self.run_dir / LAST).exists()
                else "no checkpoint had been written yet")
        return TrainingError(f"{err}\nstopped in epoch {self.epoch + 1}, batch {shard.index + 1}; {kept}")

    def _step(self, shard: Shard) -> dict:
        """One iteration on this rank's shard; the metrics are the global batch's means."""
        from l2t_dist.data import model_input

        started = time.perf_counter()
        x, y = model_input(shard.x, self.device), shard.y.to(self.device)
        t0 = time.perf_counter()
        feats = self.feeder.result(shard.handle)
        self.timing["wait_s"] += time.perf_counter() - t0
        self.parallel.weigh(shard.share)
        m = self.parallel.reduce_metrics(self.trainee.step(x, y, feats), shard.share, self.device)
        self.timing["step_s"] += time.perf_counter() - started
        self.timing["steps"] += 1
        if self.job.run.trace and self.writer:
            from l2t_dist.train.trace import trace_log, trace_record

            trace_log(self.run_dir).write(trace_record(self.trainee, x, y, feats, m, self.epoch, shard.index,
                                                       self.global_step + 1))
        return m

    # ---- evaluation
    def accuracy(self, split: str) -> float:
        """Top-1 accuracy (%) of a whole split ("val" or "test"): each rank counts its contiguous
        shard and the counts are summed, so the value is the one-process value (same formula,
        same model); a streaming rank decodes only its shard."""
        n = self.data.sizes()[split]
        if n == 0:
            return float("nan")
        lo, hi = self.parallel.shard(n)
        batches = self.data.split_batches(split, lo, hi, self.job.data.eval_batch_size)
        mine = count_correct_in(self.trainee.target, batches, self.device)
        return 100.0 * self.parallel.sum_count(mine, self.device) / n

    def _pair_report(self) -> dict:
        n = min(PAIR_REPORT_IMAGES, self.data.sizes()["val"])
        if not self.writer or self.trainee.objective.meta is None or n == 0:  # only rank 0 logs it
            return {}
        x, y = next(self.data.split_batches("val", 0, n, n))
        return pair_report(self.trainee, self.feeder, x, y, self.device)

    def _end_epoch(self) -> None:
        job = self.job
        self.parallel.average_buffers(self._bn_stats())  # evaluation and best.pt see the same statistics
        due = (self.epoch + 1) % job.run.eval_every == 0 or self.epoch + 1 == job.optim.epochs
        val = self.accuracy("val") if due else None
        test = self.accuracy("test") if due else None
        record = {"epoch": self.epoch + 1, "step": self.global_step,
                  "lr": cosine_lr(job.optim.lr, self.epoch, job.optim.epochs),
                  "train_loss": self._epoch_train["loss"], "train_acc": 100 * self._epoch_train["acc"],
                  "val_acc": val, "test_acc": test, "images_per_s": self._epoch_train["images_per_s"],
                  "pairs": self._pair_report()}
        if not math.isfinite(record["train_loss"]):
            raise TrainingError(f"non-finite training loss in epoch {self.epoch + 1}")
        self.epoch, self.batch = self.epoch + 1, 0
        if val is not None and val > self.best["val_acc"]:
            self.best = {"val_acc": val, "test_acc": test, "epoch": self.epoch}
            if self.writer:
                self.state().save(self.run_dir / BEST)
        self.history.append({k: v for k, v in record.items() if k != "pairs"})
        if self.writer:
            self.log.write(record)
        self.save()
        self._emit("on_epoch_end", record)
        if not self.quiet:
            accs = f"val {val:.2f}% test {test:.2f}% " if due else ""
            # stderr, like the progress bar: stdout stays clean for --json
            print(f"epoch {self.epoch}/{job.optim.epochs}: loss {record['train_loss']:.4f} "
                  f"train {record['train_acc']:.2f}% {accs}({record['images_per_s']:.0f} img/s)",
                  file=sys.stderr, flush=True)

    def wait_fraction(self) -> float:
        return self.timing["wait_s"] / max(1e-9, self.timing["step_s"])

    def summary(self) -> RunSummary:
        last = self.history[-1] if self.history else {}
        return RunSummary(
            run_dir=str(self.run_dir), method=self.job.method.name, epochs=self.epoch,
            best_val_acc=self.best["val_acc"], test_acc_at_best_val=self.best["test_acc"],
            best_epoch=self.best["epoch"], final_val_acc=last.get("val_acc"), final_test_acc=last.get("test_acc"),
            images_per_s=last.get("images_per_s"), pairs=self._pair_report(), backend=self.parallel.name,
            workers=self.parallel.world, replica_max_diff=self.replica_diff, wait_fraction=self.wait_fraction(),
            allreduce_bytes_per_iter=self.parallel.reduced_bytes / max(1, self.timing["steps"]))
