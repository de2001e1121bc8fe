"""`l2t-dist train JOB --backend ray`: connect, plan resources, serve sources, fit, collect.

1. connect: a local Ray (started here with an explicit CPU count), or cluster.address
   (probed first, so an unreachable address fails in seconds, not at a Ray timeout);
2. check the job's models and pairs as train builds them (l2t_dist/validate.py, before Ray
   starts), estimate each worker's and source actor's memory (distributed/memory.py), plan
   and check CPUs, GPUs and memory (distributed/resources.py): a job that cannot be placed
   fails before anything starts, naming what it asked for and what the cluster has;
3. served mode: start the source actors and wait for them to load (bounded wait);
   colocated mode: load the sources once here first, so a bad checkpoint fails at once;
4. `launch` (shared with Tune trials): a Ray Train TorchTrainer runs distributed/worker.py on
   cluster.workers workers, with FailureConfig(max_failures) and checkpoints reported every
   epoch; crashes are retried, while a user error that every rank agreed on (a NaN loss)
   comes back as rank 0's return value and is raised here;
5. the run directory ends up as with the local backend (job.yaml, metrics.jsonl, last.pt,
   best.pt); on a multi-node cluster without shared storage the driver copies the latest
   checkpoint back into it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Optional, Sequence

from l2t_dist.config import JobConfig
from l2t_dist.errors import (
    AgreedFailure,
    CheckpointError,
    ConfigError,
    L2TError,
    TrainingError,
    last_line,
    unwrap_ray_error,
)
from l2t_dist.train.parallel import check_batch_size
from l2t_dist.train.run_dir import LAST, RunDir
from l2t_dist.train.state import RunSummary, TrainingState

PROBE_TIMEOUT_S = 5.0
# Ray Train's controller polls the workers every 2 s by default, and `ray.train.report` blocks
# until it is polled: a job reporting every epoch waited up to 2 s per epoch (measured: 60 epochs
# of the demo's scratch target, 0.7 s of training and 1.3 s of waiting each). Ray Train hands this
# variable from the process that calls fit() to its controller; a value the user set wins.
REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"


def _import_ray():
    try:
        import ray
        import ray.train  # noqa: F401
        from ray.train.torch import TorchTrainer  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--backend ray needs Ray Train ({exc}); install it with "
                          "`pip install \"ray[default,train]==2.60.0\"`, or use --backend local") from None
    return ray


def _probe(address: str) -> None:
    """Fail in seconds when nothing listens at HOST:PORT (ray.init would retry for a minute)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"cluster.address={address!r} must be 'auto', HOST:PORT (the head's GCS, e.g. "
                          "10.0.0.1:6379) or ray://HOST:10001")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at cluster.address={address!r} ({exc}); start it with "
                          "`ray start --head` on the head node, check host and port, or leave cluster.address "
                          "unset to start a local Ray") from None


def connect(cluster, quiet: bool = False) -> bool:
    """Join or start Ray; True when this call did (so the caller shuts it down)."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            _probe(address)
            ray.init(address=address, log_to_driver=not quiet)
        else:
            # "local": always a new instance. A bare ray.init() would join the latest `ray start`
            # (or test) cluster of this machine and then refuse num_cpus.
            ray.init(address="local", num_cpus=cluster.num_cpus or os.cpu_count() or 1, log_to_driver=not quiet)
    except L2TError:
        raise
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot connect to Ray at {address or 'a new local instance'!r}: {exc}") from None
    except ray.exceptions.AuthenticationError as exc:
        raise ConfigError(f"the Ray cluster at {address or 'a new local instance'!r} refused this client's token "
                          f"({last_line(exc)}); set RAY_AUTH_MODE=token and give the cluster's token with "
                          "RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token, or RAY_AUTH_TOKEN): docs/distributed.md, "
                          "'On a real cluster'") from None
    return True


def cluster_snapshot():
    """(free, total, per-node totals) restricted to schedulable resources, memory included
    (bytes: the memory check needs it; the object store is not asked for)."""
    import ray

    def keep(res: dict) -> dict:
        return {k: float(v) for k, v in res.items()
                if not k.startswith("node:") and k != "object_store_memory"
                and not k.startswith("accelerator_type")}

    nodes = [keep(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    return keep(ray.available_resources()), keep(ray.cluster_resources()), nodes


def _nodes_are_here() -> bool:
    """True when every alive Ray node runs on this machine (its files are the workers' files)."""
    import ray

    here = ray.util.get_node_ip_address()
    return all(n.get("NodeManagerAddress") == here for n in ray.nodes() if n.get("Alive"))


def _check_colocated_sources(job: JobConfig, only_present: bool = False) -> None:
    """Colocated mode: load the sources here as the workers (and the local backend) will, so a
    missing or mismatched checkpoint fails before any worker starts, with the local backend's
    error. `only_present`: the workers run on other machines, whose files this one may lack;
    check the checkpoints found here (a worker that lacks one stops the run without restarts)."""
    import torch

    from l2t_dist.sources.colocated import load_sources

    configs = [s for s in job.sources if not only_present or Path(s.checkpoint).is_file()]
    if configs:
        load_sources(configs, torch.device("cpu"))


def train_ray(job: Optional[JobConfig], resume: Optional[str] = None, quiet: bool = False,
              address: Optional[str] = None, tracking=None) -> RunSummary:
    """Train on Ray (or resume RUN_DIR); returns the summary of the run, with Ray's fields.
    `address` overrides cluster.address (the CLI's --address)."""
    run_dir = RunDir.open(job, resume, absolute=True)  # workers may start in another directory
    job = run_dir.job
    if address:
        job.cluster.address = address
    cc = job.cluster
    check_batch_size(job.data.batch_size, cc.workers)
    ray = _import_ray()
    from l2t_dist.distributed.memory import estimate_memory
    from l2t_dist.distributed.resources import check_placement, plan_resources

    memory = estimate_memory(job)  # builds the job's models without weights: train's errors for taps and pairs
    colocated = cc.sources_mode == "colocated" and bool(job.sources)
    new_local_ray = not (cc.address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    if colocated and new_local_ray:  # this machine is the cluster: check before Ray starts
        _check_colocated_sources(job)
    started_ray = connect(cc, quiet=quiet)
    try:
        if colocated and not new_local_ray:
            _check_colocated_sources(job, only_present=not _nodes_are_here())
        free, total, nodes = cluster_snapshot()
        plan = plan_resources(cc, len(job.sources), free, memory)
        check_placement(plan, free, total, nodes)
        if not quiet:
            from l2t_dist.distributed.resources import _fmt

            print(f"[ray] plan: {plan.describe()}; cluster free: {_fmt(free)}", flush=True)
            if plan.memory_note:
                print(f"[ray] {plan.memory_note}", flush=True)
        storage = Path(cc.storage_path).resolve() if cc.storage_path else None
        return launch(run_dir, plan, quiet=quiet, tracking=tracking, storage=storage)
    finally:
        if started_ray:
            ray.shutdown()


def launch(run_dir: RunDir, plan, *, quiet: bool = True, tracking=None, storage: Optional[Path] = None,
           callbacks: Sequence = ()) -> RunSummary:
    """Serve the sources (when the plan has actors), fit a TorchTrainer of distributed/worker.py
    on the run, and collect its outputs into the run directory. Shared by `train --backend ray`
    and by the Tune trials that start their own trainer (`callbacks`: TuneReportCallback)."""
    import ray

    job, cc = run_dir.job, run_dir.job.cluster
    config = {"job": job.model_dump(mode="json"), "run_dir": str(run_dir.path), "quiet": quiet,
              "threads": job.run.threads or plan.worker_threads, "served": plan.actors is not None}
    handles: dict = {}
    source_nodes = None
    try:
        if plan.actors is not None:
            from l2t_dist.distributed.serving import start_source_actors

            t0 = time.perf_counter()
            handles, infos = start_source_actors([s.model_dump(mode="json") for s in job.sources], cc.source_actors,
                                                 plan.actors.resources, plan.actor_threads, cc.actor_max_restarts,
                                                 cc.start_timeout_s)
            config.update(source_handles=handles, source_infos=[infos[s.name] for s in job.sources])
            source_nodes = {n: i["node_id"] for n, i in infos.items()}
            if not quiet:
                where = ", ".join(f"{n}@{i['node']}" for n, i in infos.items())
                print(f"[ray] source actors ready in {time.perf_counter() - t0:.1f}s: {where}", flush=True)
        if run_dir.state is not None:
            config["resume_state"] = ray.put(run_dir.last.read_bytes())
        if tracking is not None:  # MLflow (l2t_dist/tracking): the driver opens the run, rank 0 writes it
            config["tracking"] = tracking.for_workers(job, run_dir.path)
        storage = storage or run_dir.path / "ray"
        ray_name = f"{job.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        summary = _collect(_fit(job, plan, config, storage, ray_name, callbacks), run_dir.path)
        summary.ray_storage = str(storage / ray_name)
        if handles:
            from l2t_dist.distributed.serving import actor_stats

            summary.source_actors = actor_stats(handles)
            summary.source_nodes = source_nodes
        return summary
    finally:
        if handles:
            from l2t_dist.distributed.serving import stop_source_actors

            stop_source_actors(handles)


def _fit(job: JobConfig, plan, config: dict, storage: Path, name: str, callbacks: Sequence = ()):
    """Build and fit the TorchTrainer; Ray's failure types are unwrapped to the user's error."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from l2t_dist.distributed.worker import train_loop_per_worker

    cc = job.cluster
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)
    worker_res = dict(plan.workers.resources)
    use_gpu = worker_res.get("GPU", 0) > 0
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cc.workers, use_gpu=use_gpu, resources_per_worker=worker_res),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=cc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING"),
                             # Ray's print patch would log every line of the workers twice
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}))
    try:
        return trainer.fit()
    except L2TError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray's failure types: unwrap to the user's error
        from ray.train import TrainingFailedError

        if not isinstance(exc, TrainingFailedError):
            raise
        ours = unwrap_ray_error(exc)
        if ours is not None:
            raise ours from None
        failures = getattr(exc, "worker_failures", None) or {}
        first = failures.get(0, next(iter(failures.values()), None)) if failures else None
        raise TrainingError(f"distributed training failed (after up to cluster.max_failures={cc.max_failures} "
                            f"restarts): {last_line(first or getattr(exc, 'controller_failure', None) or exc)}") \
            from None


def _fetch_outputs(result, run_dir: Path) -> None:
    if not (run_dir / LAST).exists() and result.checkpoint is not None:
        result.checkpoint.to_directory(str(run_dir))  # multi-node without shared storage


def _collect(result, run_dir: Path) -> RunSummary:
    """Make sure the driver's run directory holds the outputs, and return rank 0's summary; a
    failure that the workers agreed on (a NaN loss) is raised here, with the last good
    checkpoint left in run_dir as with --backend local."""
    _fetch_outputs(result, run_dir)
    returned = getattr(result, "return_value", None)
    if isinstance(returned, AgreedFailure):
        raise returned.error
    if not (run_dir / LAST).exists():
        raise CheckpointError(f"the Ray run finished but left no checkpoint in {str(run_dir)!r}")
    summary = returned if isinstance(returned, RunSummary) else RunSummary.from_state(
        TrainingState.load(run_dir / LAST), run_dir, backend="ray")
    summary.run_dir = str(run_dir)
    return summary
