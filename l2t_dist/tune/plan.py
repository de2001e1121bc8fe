"""Trial resources and concurrency, chosen and checked before the sweep starts (no Ray here).

Ray waits forever for resources that never come (ENV.md). Tune would queue a trial that can
never be placed, and Ray-backend trials whose workers and source actors are started inside
the trial can starve each other. So the sweep decides everything itself:
- local trials: `run.threads` CPUs each (default 1, and the trial trains with that many
  threads), plus one GPU each when the job may use a GPU and the cluster has one; at most as
  many at once as fit;
- Ray-backend trials: the trial itself holds {"CPU": 0.01} (a whole CPU would starve its own
  workers), its workers and source actors are sized so that `max_concurrent_trials` whole
  trials fit at once, and those sizes are written into every trial's job (cluster.*), so
  that a trial never waits for another one's workers.
Memory counts like CPUs (distributed/memory.py estimates it; a local trial is one process
with the whole batch and its sources), when the cluster reports it (Ray always does).
A trial that cannot fit fails the command at once, naming both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from l2t_dist.config import JobConfig
from l2t_dist.distributed.resources import (
    EPS,
    GIB,
    MEMORY,
    MIN_CPU,
    Plan,
    _fmt,
    check_placement,
    memory_hint,
    plan_resources,
)
from l2t_dist.errors import ConfigError

TRIAL_CPU = MIN_CPU  # a Ray-backend trial only waits on its TorchTrainer; {"CPU": 0} is rejected


@dataclass
class TrialPlan:
    backend: str
    trial_resources: dict[str, float]       # what tune.with_resources reserves for the trial itself
    per_trial: dict[str, float]             # everything one trial holds (its workers and actors included)
    concurrency: int
    job_overrides: dict = field(default_factory=dict)  # dotted key -> value, written into every trial job
    notes: list[str] = field(default_factory=list)
    train: Optional[Plan] = None

    def describe(self) -> str:
        inner = f" (trial {_fmt(self.trial_resources)} + {self.train.describe()})" if self.train else ""
        return f"{self.concurrency} trial(s) at once x {_fmt(self.per_trial)}{inner}"


def _fits(need: dict[str, float], node: dict[str, float]) -> int:
    """How many copies of `need` fit on `node`."""
    counts = [math.floor((node.get(k, 0.0) + EPS) / v) for k, v in need.items() if v > 0]
    return min(counts) if counts else 0


def _concurrency(requested: Optional[int], fit: int, what: str, notes: list[str]) -> int:
    if requested is None:
        return max(1, fit)
    if requested > fit:
        notes.append(f"max_concurrent_trials={requested} lowered to {fit}: only {fit} {what} fit at once")
        return fit
    return requested


def plan_local(job: JobConfig, requested: Optional[int], total: dict[str, float],
               nodes: list[dict[str, float]]) -> TrialPlan:
    cpu = float(job.run.threads or 1)
    gpu = 1.0 if job.run.device != "cpu" and total.get("GPU", 0.0) > 0 else 0.0
    if job.run.device == "cuda" and gpu == 0:
        raise ConfigError(f"run.device=cuda but the Ray cluster has no GPU ({_fmt(total)}); use run.device=auto "
                          "or cpu, or join a cluster with GPUs (--address)")
    need = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    if MEMORY in total:
        from l2t_dist.distributed.memory import estimate_memory

        need[MEMORY] = float(estimate_memory(job, workers=1, colocated=True).worker)
    per_node = [_fits(need, n) for n in (nodes or [total])]
    if not any(per_node):
        raise ConfigError(f"cannot place a trial: each local trial needs {_fmt(need)} (run.threads={job.run.threads}) "
                          f"but no node has that much; the nodes have: " + "; ".join(_fmt(n) for n in nodes or [total])
                          + ". Lower run.threads.")
    notes: list[str] = []
    n = _concurrency(requested, sum(per_node), "local trials", notes)
    overrides = {} if job.run.threads else {"run.threads": int(cpu)}
    return TrialPlan("local", {k.lower(): v for k, v in need.items()}, need, n, overrides, notes)


def plan_ray(job: JobConfig, requested: Optional[int], total: dict[str, float],
             nodes: list[dict[str, float]]) -> TrialPlan:
    """Size the workers/actors of one trial from the share of the cluster it gets."""
    cc = job.cluster
    n = requested or 1
    share = {k: v / n for k, v in total.items()}
    share["CPU"] = total.get("CPU", 0.0) / n - TRIAL_CPU
    memory = None
    if MEMORY in total:
        from l2t_dist.distributed.memory import estimate_memory

        memory = estimate_memory(job)
    train = plan_resources(cc, len(job.sources), share, memory)
    need = train.total()
    per_trial = dict(need)
    per_trial["CPU"] = per_trial.get("CPU", 0.0) + TRIAL_CPU
    short = [k for k, v in per_trial.items() if v * n > total.get(k, 0.0) + EPS]
    if short:
        raise ConfigError(
            f"cannot place the sweep: {n} Ray-backend trial(s) at once, each {_fmt(per_trial)} (the trial "
            f"{{CPU: {TRIAL_CPU}}} + {train.describe()}), need more than the cluster's {_fmt(total)} "
            f"(short of {', '.join(sorted(short))}); lower max_concurrent_trials, cluster.workers or the "
            f"cluster.*_per_worker / *_per_source_actor quantities, or add nodes" + memory_hint(train, short))
    check_placement(train, total, total, nodes)  # every single worker/actor fits on some node
    # the trial re-plans from its job alone (trial.py): every size chosen here goes into it
    overrides = {"cluster.cpus_per_worker": train.workers.resources["CPU"]}
    if MEMORY in train.workers.resources:
        overrides["cluster.memory_per_worker_gb"] = train.workers.resources[MEMORY] / GIB
    if train.actors is not None:
        overrides["cluster.cpus_per_source_actor"] = train.actors.resources["CPU"]
        if MEMORY in train.actors.resources:
            overrides["cluster.memory_per_source_actor_gb"] = train.actors.resources[MEMORY] / GIB
    return TrialPlan("ray", {"cpu": TRIAL_CPU}, per_trial, n, overrides, [], train)


def plan_trials(job: JobConfig, backend: str, requested: Optional[int], total: dict[str, float],
                nodes: list[dict[str, float]]) -> TrialPlan:
    if backend == "ray":
        return plan_ray(job, requested, total, nodes)
    return plan_local(job, requested, total, nodes)
