"""The Ray Train worker: the training loop with a data-parallel strategy, reporting to Ray Train.

Every checkpoint (each epoch, and every run.checkpoint_every iterations) is reported with
`ray.train.report` by every rank (it is a barrier); rank 0 attaches a checkpoint directory
with last.pt (the exact-resume state), best.pt, metrics.jsonl and job.yaml. After a failure
Ray Train restarts the worker group and `ray.train.get_checkpoint()` hands back the latest
one, from which every rank restores; rank 0 also puts its files back into the run directory.

Failures (l2t_dist/errors.py): Ray 2.60 restarts the worker group on every worker error,
`cluster.max_failures` times. A user error that every rank raised at the same point (an
`AgreedFailure`: a non-finite loss, a bad checkpoint in colocated mode) would fail the same
way again, so it is returned instead, the group finishes together, and the driver raises it.
Anything else (a `RetryableError` of the source service, a crash, a killed process) is
raised: Ray Train restarts from the latest checkpoint.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from l2t_dist.errors import AgreedFailure
from l2t_dist.train.run_dir import JOB, LAST, OUTPUT_FILES
from l2t_dist.train.state import RunSummary, TrainingState


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class RayReporter:
    """A loop callback: after every checkpoint, metrics from every rank, the files from rank 0."""

    def on_checkpoint(self, loop, epoch_end: bool) -> None:
        import ray.train

        metrics = dict(loop.history[-1]) if epoch_end and loop.history else {}
        metrics.update({"epoch": loop.epoch, "step": loop.global_step, "mid_epoch": not epoch_end,
                        "replica_max_diff": loop.replica_diff, "wait_fraction": loop.wait_fraction()})
        name = f"checkpoint-e{loop.epoch:04d}-s{loop.global_step:08d}"
        if not loop.writer:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory(prefix="l2t-ckpt-") as tmp:
            for f in OUTPUT_FILES:
                if (loop.run_dir / f).exists():
                    _link_or_copy(loop.run_dir / f, Path(tmp) / f)
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


def train_loop_per_worker(config: dict) -> Union[RunSummary, AgreedFailure, None]:
    """Entry point of every Ray Train worker: rank 0 returns the run summary, or the failure
    that every rank agreed on; the other ranks return None."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    try:
        summary = _train(config)
    except AgreedFailure as failure:
        return failure if rank == 0 else None
    return summary if rank == 0 else None


def _initial_state(config: dict, run_dir: Path, rank: int) -> tuple[Optional[TrainingState], Optional[str]]:
    """(state to start from, how it came): Ray's latest checkpoint after a restart, else the
    driver's last.pt for `--resume`, else nothing."""
    import ray
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restart after a failure: the latest reported checkpoint wins
        with ckpt.as_directory() as d:
            state = TrainingState.load(Path(d) / LAST)
            if rank == 0:
                _restore_files(Path(d), run_dir)
        return state, "ray-failover"
    if config.get("resume_state") is not None:  # `--resume RUN_DIR`: the driver's last.pt
        obj = torch.load(io.BytesIO(ray.get(config["resume_state"])), map_location="cpu", weights_only=True)
        return TrainingState.from_checkpoint(obj, f"{run_dir / LAST} (sent by the driver)"), "resume"
    return None, None


def _train(config: dict) -> RunSummary:
    import ray
    import ray.train

    from l2t_dist.config import dump_job, parse_job
    from l2t_dist.train.loop import TrainingLoop
    from l2t_dist.train.parallel import DataParallel

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    job = parse_job(config["job"], where="job sent to the Ray worker")
    if not job.run.threads:
        torch.set_num_threads(int(config.get("threads", 1)))
    run_dir = Path(config["run_dir"])
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / JOB).exists():
            (run_dir / JOB).write_text(dump_job(job))
    state, restored_by = _initial_state(config, run_dir, rank)

    sources = feeder = None
    if config.get("served"):
        from l2t_dist.distributed.serving import ServedFeeder

        def sources():  # built where the sources would be loaded: the same RNG draws, the same init
            return _skeleton_sources(config["source_infos"])

        cc = job.cluster

        def feeder(trainee):
            device = next(trainee.target.parameters()).device
            return ServedFeeder(config["source_handles"], trainee.requests, rank, cc.feature_dtype, device,
                                cc.request_timeout_s, cc.prefetch)

    callbacks: list = [RayReporter()]
    if rank == 0 and config.get("tracking"):  # MLflow: only rank 0 writes the run ...
        from l2t_dist.tracking.callback import MlflowCallback

        callbacks.insert(0, MlflowCallback.from_config(config["tracking"]))
    elif config.get("tracking"):  # ... the other ranks add their node's system metrics to it
        from l2t_dist.tracking.sysmetrics import RankSystemMetrics

        callbacks.insert(0, RankSystemMetrics(config["tracking"]["uri"], config["tracking"]["run_id"], rank))
    parallel = DataParallel(rank, world, meta_sync=job.cluster.meta_sync, sync_bn=job.cluster.sync_bn)
    loop = TrainingLoop(job, run_dir, parallel=parallel, sources=sources, feeder=feeder,
                        callbacks=callbacks, quiet=config.get("quiet", False))
    summary = loop.run(state)
    summary.backend = "ray"
    summary.restored_at_step = None if state is None else state.global_step
    summary.restored_by = restored_by
    summary.sync_bn = parallel.sync_bn
    if hasattr(loop.feeder, "bytes_per_image"):
        summary.feature_bytes_per_image = loop.feeder.bytes_per_image()
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    summary.worker_nodes = nodes
    return summary
