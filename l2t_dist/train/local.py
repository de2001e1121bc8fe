"""The one-process trainer: load checkpoint -> for each epoch: steps, evaluate, save.

Runs with neither Ray nor MLflow installed (the GPU boxes have neither). Outputs go to
OUT_DIR/NAME: job.yaml, metrics.jsonl, last.pt (resume state) and best.pt (best val).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from l2t_dist.config import JobConfig, dump_job, parse_job
from l2t_dist.errors import ConfigError, TrainingError
from l2t_dist.train.build import Trainee, build_trainee, pick_device
from l2t_dist.train.checkpoint import FORMAT, load_training_state, rng_state, save_atomic, set_rng_state
from l2t_dist.train.data_pipeline import TaskData, batches_per_epoch, cosine_lr, epoch_batches, eval_batches, prepare_data
from l2t_dist.train.metrics import JsonlLog, Progress


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             device: torch.device) -> float:
    from l2t_dist.data import normalize

    if len(y) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for xb, yb in eval_batches(x, y, batch_size):
        correct += (model(normalize(xb).to(device)).argmax(1).cpu() == yb).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(y)


@torch.no_grad()
def pair_report(trainee: Trainee, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, dict]:
    """Mean λ and channel-weight entropy per pair on a batch: what the meta-networks chose."""
    from l2t_dist.data import normalize

    obj = trainee.objective
    if obj.meta is None or len(y) == 0:
        return {}
    xb = normalize(x[:256]).to(device)
    batch = obj.prepare(xb, y[:256].to(device), trainee.bank.features(xb))
    report = {}
    for i, pair in enumerate(trainee.pairs):
        pooled = batch.raw_sources[i].mean((2, 3))
        w = obj.meta.what[i](pooled)
        entropy = float(-(w * w.clamp_min(1e-12).log()).sum(1).mean())
        report[pair.name] = {"lambda": float(batch.lams[i].mean()), "entropy": entropy}
    return report


class LocalRun:
    """State of one run and the loop over it; `run()` returns the summary dict."""

    def __init__(self, job: JobConfig, run_dir: Path, quiet: bool = False, callbacks: Sequence = (),
                 sources: Optional[list] = None):
        self.job, self.run_dir, self.quiet = job, run_dir, quiet
        # Only the writer saves checkpoints and the metrics log (data parallel: rank 0 only).
        self.writer = True
        # Edges (experiment tracking, Ray reporting) hook in here; the loop itself knows none of them.
        # Each callback may define on_start(run), on_epoch_end(run, record), on_end(run, summary).
        self.callbacks = list(callbacks)
        if job.run.threads:
            torch.set_num_threads(job.run.threads)
        torch.set_default_dtype(getattr(torch, job.run.dtype))
        self.device = pick_device(job.run.device)
        torch.manual_seed(job.run.seed)
        self.data: TaskData = prepare_data(job.data)
        # `sources`: pre-built LoadedSources, or a factory called here, where they would be loaded,
        # so that the target's initialisation sees the same RNG state (served mode builds skeletons).
        self.trainee = build_trainee(job, self.data.num_classes, self.device,
                                     sources=sources() if callable(sources) else sources)
        self.log = JsonlLog(run_dir / "metrics.jsonl")
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.best = {"val_acc": -1.0, "test_acc": None, "epoch": None}
        self.history: list[dict] = []
        self.sums: dict = {}  # running sums of the epoch in progress (saved, so a resume mid-epoch is exact)

    # ---- checkpoints
    def _state(self) -> dict:
        t = self.trainee
        return {
            "format": FORMAT, "arch": self.job.target.arch, "num_classes": self.data.num_classes,
            "state_dict": t.target.state_dict(),
            "meta": {"epoch": self.epoch, "best_val_acc": self.best["val_acc"], "job": self.job.run.name},
            "trainer": {
                "job": self.job.model_dump(mode="json"),
                "student": t.objective.student.state_dict(),
                "phi": t.objective.meta.state_dict() if t.objective.meta is not None else None,
                "step": t.step.state_dict(),
                "epoch": self.epoch, "batch": self.batch, "global_step": self.global_step,
                "best": dict(self.best), "history": list(self.history), "sums": dict(self.sums),
                "rng": rng_state(),
            },
        }

    def save(self) -> None:
        if self.writer:
            save_atomic(self._state(), self.run_dir / "last.pt")

    def restore(self, state: dict) -> None:
        tr, t = state["trainer"], self.trainee
        t.objective.student.load_state_dict(tr["student"])
        if tr["phi"] is not None:
            t.objective.meta.load_state_dict(tr["phi"])
        t.step.load_state_dict(tr["step"])
        self.epoch, self.batch, self.global_step = tr["epoch"], tr["batch"], tr["global_step"]
        self.best, self.history, self.sums = tr["best"], tr["history"], tr["sums"]
        set_rng_state(tr["rng"])
        if self.writer:
            self.log.truncate_after(self.epoch, self.global_step)
            if self.job.run.trace:
                from l2t_dist.train.trace import trace_log

                trace_log(self.run_dir).truncate_after(self.epoch, self.global_step)

    # ---- the loop
    def run(self) -> dict:
        job = self.job
        n_batches = self._batches_per_epoch()
        self._emit("on_start")
        while self.epoch < job.optim.epochs:
            self._train_epoch(n_batches)
            self._end_epoch()
        summary = self.summary()
        self._emit("on_end", summary)
        return summary

    def _batches_per_epoch(self) -> int:
        n_batches = batches_per_epoch(len(self.data.train_y), self.job.data.batch_size)
        if self.job.run.max_iters_per_epoch:
            n_batches = min(n_batches, self.job.run.max_iters_per_epoch)
        return n_batches

    def _batches(self, start: int):
        """The epoch's global batches (index, uint8 images, labels) from batch `start` on."""
        job = self.job
        return epoch_batches(self.data.train_x, self.data.train_y, batch_size=job.data.batch_size,
                             seed=job.run.seed, epoch=self.epoch, augment=job.data.augment, start=start)

    def _step(self, b: int, xb: torch.Tensor, yb: torch.Tensor) -> dict:
        """One iteration on global batch b; returns the batch's mean metrics (a data-parallel
        subclass runs its shard and averages the metrics over ranks)."""
        from l2t_dist.data import normalize

        x, y = normalize(xb).to(self.device), yb.to(self.device)
        feats = self.trainee.bank.features(x)
        m = self.trainee.step(x, y, feats)
        self._trace(x, y, feats, m, b)
        return m

    def _trace(self, x, y, feats, m: dict, b: int) -> None:
        if self.job.run.trace and self.writer:
            from l2t_dist.train.trace import trace_log, trace_record

            trace_log(self.run_dir).write(trace_record(self.trainee, x, y, feats, m, self.epoch, b,
                                                       self.global_step + 1))

    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self, *args)

    def _train_epoch(self, n_batches: int) -> None:
        job, t = self.job, self.trainee
        t.step.set_lr(cosine_lr(job.optim.lr, self.epoch, job.optim.epochs))
        bar = Progress(n_batches - self.batch, f"epoch {self.epoch + 1}/{job.optim.epochs}", quiet=self.quiet)
        if self.batch == 0:
            self.sums = {"loss": 0.0, "ce": 0.0, "acc": 0.0, "n": 0}
        sums = self.sums
        started = time.perf_counter()
        images = 0
        for b, xb, yb in self._batches(self.batch):
            if b >= n_batches:
                break
            try:
                m = self._step(b, xb, yb)
            except TrainingError as err:
                last = self.run_dir / "last.pt"
                kept = (f"the last good checkpoint is kept at {last}" if last.exists()
                        else "no checkpoint had been written yet")
                raise TrainingError(f"{err}\nstopped in epoch {self.epoch + 1}, batch {b + 1}; {kept}") from None
            self.batch, self.global_step = b + 1, self.global_step + 1
            images += len(yb)
            for k in ("loss", "ce", "acc"):
                sums[k] += m[k] * len(yb)
            sums["n"] += len(yb)
            bar.update(len(yb), loss=m["loss"], acc=100 * m["acc"])
            if job.run.checkpoint_every and self.global_step % job.run.checkpoint_every == 0:
                self.save()
        self._epoch_train = {k: sums[k] / max(1, sums["n"]) for k in ("loss", "ce", "acc")}
        self._epoch_train["images_per_s"] = images / max(1e-9, time.perf_counter() - started)

    # ---- evaluation hooks (the data-parallel subclass shards them)
    def _before_eval(self) -> None:
        """Called before the epoch's evaluation (data parallel: average the BN statistics)."""

    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return accuracy(self.trainee.target, x, y, self.job.data.eval_batch_size, self.device)

    def _pair_report(self) -> dict:
        return pair_report(self.trainee, self.data.val_x, self.data.val_y, self.device)

    def _end_epoch(self) -> None:
        job, d = self.job, self.data
        self._before_eval()
        due = (self.epoch + 1) % job.run.eval_every == 0 or self.epoch + 1 == job.optim.epochs
        val = self._accuracy(d.val_x, d.val_y) if due else None
        test = self._accuracy(d.test_x, d.test_y) if due else None
        pairs = self._pair_report()
        record = {"epoch": self.epoch + 1, "step": self.global_step,
                  "lr": cosine_lr(job.optim.lr, self.epoch, job.optim.epochs),
                  "train_loss": self._epoch_train["loss"], "train_acc": 100 * self._epoch_train["acc"],
                  "val_acc": val, "test_acc": test, "images_per_s": self._epoch_train["images_per_s"],
                  "pairs": pairs}
        if not math.isfinite(record["train_loss"]):
            raise TrainingError(f"non-finite training loss in epoch {self.epoch + 1}")
        self.epoch, self.batch = self.epoch + 1, 0
        if val is not None and val > self.best["val_acc"]:
            self.best = {"val_acc": val, "test_acc": test, "epoch": self.epoch}
            if self.writer:
                save_atomic(self._state(), self.run_dir / "best.pt")
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

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {"run_dir": str(self.run_dir), "method": self.job.method.name, "epochs": self.epoch,
                "best_val_acc": self.best["val_acc"], "test_acc_at_best_val": self.best["test_acc"],
                "best_epoch": self.best["epoch"], "final_val_acc": last.get("val_acc"),
                "final_test_acc": last.get("test_acc"), "images_per_s": last.get("images_per_s"),
                "pairs": pair_report(self.trainee, self.data.val_x, self.data.val_y, self.device)}


def train_local(job: Optional[JobConfig], resume: Optional[str] = None, quiet: bool = False,
                callbacks: Sequence = ()) -> dict:
    """Train from a job, or resume the run in RUN_DIR from its last checkpoint."""
    if resume:
        run_dir = Path(resume)
        state = load_training_state(run_dir / "last.pt")
        job = parse_job(state["trainer"]["job"], where=f"checkpoint {run_dir / 'last.pt'}")
        run = LocalRun(job, run_dir, quiet, callbacks)
        run.restore(state)
        return run.run()
    assert job is not None
    run_dir = Path(job.run.out_dir) / job.run.name
    if (run_dir / "last.pt").exists():
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; continue it with "
                          f"`--resume {run_dir}`, or pick another run.name (run.name=NEW)")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(dump_job(job))
    return LocalRun(job, run_dir, quiet, callbacks).run()
