"""The Ray Train worker loop: one DataParallelRun per worker, reporting to Ray Train.

Every checkpoint (each epoch, and every run.checkpoint_every iterations) is reported with
`ray.train.report` by every rank (it is a barrier); rank 0 attaches a checkpoint directory
with last.pt (the exact-resume state), best.pt, metrics.jsonl and job.yaml. After a failure
Ray Train restarts the worker group and `ray.train.get_checkpoint()` hands back the latest
one, from which every rank restores; rank 0 also puts its files back into the run directory.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

OUTPUT_FILES = ("last.pt", "best.pt", "metrics.jsonl", "job.yaml")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class RayReporter:
    """DataParallelRun's reporter: metrics from every rank, the checkpoint from rank 0."""

    def __init__(self, feeder_stats=None):
        self.feeder_stats = feeder_stats

    def __call__(self, run, epoch_end: bool) -> None:
        import ray.train

        metrics = dict(run.history[-1]) if epoch_end and run.history else {}
        metrics.update({"epoch": run.epoch, "step": run.global_step, "mid_epoch": not epoch_end,
                        "replica_max_diff": run.replica_diff, "wait_fraction": run.wait_fraction()})
        name = f"checkpoint-e{run.epoch:04d}-s{run.global_step:08d}"
        if not run.writer:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(prefix="l2t-ckpt-") as tmp:
            for f in OUTPUT_FILES:
                if (run.run_dir / f).exists():
                    _link_or_copy(run.run_dir / f, Path(tmp) / f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def _restore_files(ckpt_dir: Path, run_dir: Path) -> None:
    """Rank 0 after a restart: the run directory goes back to the reported checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in OUTPUT_FILES:
        if (ckpt_dir / f).exists():
            shutil.copy2(ckpt_dir / f, run_dir / f".{f}.restore")
            os.replace(run_dir / f".{f}.restore", run_dir / f)


def _skeleton_sources(infos: list[dict]) -> list:
    """Served mode: the worker needs each source's taps and shapes, not its weights."""
    from l2t_dist.models import build_model
    from l2t_dist.sources.colocated import LoadedSource

    return [LoadedSource(i["name"], i["arch"], build_model(i["arch"], i["num_classes"]).eval(), list(i["taps"]),
                         dict(i.get("meta") or {})) for i in infos]


FAILED = "l2t_error"  # rank 0's return value {FAILED: err}: a deterministic error for the driver to raise


def train_loop_per_worker(config: dict) -> Optional[dict]:
    """Entry point of every Ray Train worker; returns the run summary on rank 0.

    Ray 2.60 restarts the worker group on every worker error, `cluster.max_failures` times.
    A user error (a non-finite loss, a bad checkpoint in colocated mode) would fail the same
    way again, so it is returned instead: DataParallelRun marks the L2TErrors that every
    rank raises at the same point (`on_all_ranks`), the group then finishes together, and the
    driver raises rank 0's error. Anything else (a retryable error of the source service, a
    crash, a killed process) is raised: Ray Train restarts from the latest checkpoint."""
    from l2t_dist.errors import L2TError

    try:
        return _train_loop(config)
    except L2TError as err:
        if err.retryable or not getattr(err, "on_all_ranks", False):
            raise
        import ray.train

        return {FAILED: err} if ray.train.get_context().get_world_rank() == 0 else None


def _train_loop(config: dict) -> Optional[dict]:
    import ray
    import ray.train

    from l2t_dist.config import dump_job, parse_job
    from l2t_dist.distributed.dataparallel import DataParallelRun
    from l2t_dist.train.checkpoint import load_training_state

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    job = parse_job(config["job"], where="job sent to the Ray worker")
    if not job.run.threads:
        torch.set_num_threads(int(config.get("threads", 1)))
    run_dir = Path(config["run_dir"])
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "job.yaml").exists():
            (run_dir / "job.yaml").write_text(dump_job(job))

    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restart after a failure: the latest reported checkpoint wins
        with ckpt.as_directory() as d:
            state = load_training_state(Path(d) / "last.pt")
            if rank == 0:
                _restore_files(Path(d), run_dir)
    elif config.get("resume_state") is not None:  # `--resume RUN_DIR`: the driver's last.pt
        state = torch.load(io.BytesIO(ray.get(config["resume_state"])), map_location="cpu", weights_only=False)

    sources = feeder = None
    if config.get("served"):
        from l2t_dist.distributed.serving import ServedFeeder

        def sources():  # built where LocalRun would load them: the same RNG draws, the same init
            return _skeleton_sources(config["source_infos"])

        cc = job.cluster

        def feeder(trainee):
            needed = {s.name: (list(s.needed), bool(s.want_logits)) for s in trainee.sources
                      if s.needed or s.want_logits}
            device = next(trainee.target.parameters()).device
            return ServedFeeder(config["source_handles"], needed, rank, cc.feature_dtype, device,
                                cc.request_timeout_s, cc.prefetch)

    callbacks = []
    if rank == 0 and config.get("tracking"):  # MLflow: only rank 0 writes
        from l2t_dist.tracking.callback import MlflowCallback

        callbacks.append(MlflowCallback.from_config(config["tracking"]))
    run = DataParallelRun(job, run_dir, rank=rank, world=world, quiet=config.get("quiet", False),
                          callbacks=callbacks, sources=sources, feeder=feeder, reporter=RayReporter())
    if state is not None:
        run.restore(state)
        run.sync_replicas()
    summary = run.run()
    summary["backend"] = "ray"
    # where this worker group started: None for a fresh run, else the step it restored
    summary["restored_at_step"] = None if state is None else int(state["trainer"]["global_step"])
    summary["restored_by"] = None if state is None else ("ray-failover" if ckpt is not None else "resume")
    if hasattr(run.feeder, "bytes_per_image"):
        summary["feature_bytes_per_image"] = run.feeder.bytes_per_image()
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    summary["worker_nodes"] = nodes
    return summary if rank == 0 else None
