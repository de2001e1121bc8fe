"""Resource planning for `--backend ray`, checked before anything is started (no Ray here).

Ray waits forever for resources that never come (ENV.md: two 1-CPU workers and a 1-CPU
actor hang on 2 CPUs). So the command chooses every quantity itself, fractional CPUs
included, compares the plan with what the cluster has free, and fails at once with a message
that shows both sides. Auto quantities (cpus_per_worker / cpus_per_source_actor left unset)
share the free CPUs in the ratio 2:1 between a worker and a source actor.

Memory is planned too: each worker and source actor asks for Ray's `memory` resource,
`cluster.memory_per_worker_gb` / `memory_per_source_actor_gb` when set, else the estimate of
distributed/memory.py (used only against a cluster that reports memory, as Ray always does;
a resources dict without it plans CPUs and GPUs alone). A job whose workers fit the CPUs but
not the memory (64 workers on a 24 GB machine) then fails here, instead of being placed and
ended by Ray's OOM killer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from l2t_dist.config import ClusterConfig
from l2t_dist.errors import ConfigError

EPS = 1e-6
MIN_CPU = 0.01
ACTOR_SHARE = 0.5  # an auto source actor gets half of an auto worker's CPUs
MEMORY = "memory"  # Ray's resource, in bytes
GIB = 2**30


@dataclass
class Bundle:
    """`count` Ray actors that each need `resources`."""

    what: str
    count: int
    resources: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        res = {k: v for k, v in self.resources.items() if k != MEMORY}
        mem = f" and {_quantity_text(MEMORY, self.resources[MEMORY])} memory each" if self.resources.get(MEMORY) else ""
        return f"{self.count} {self.what} x {_fmt(res)}{mem}"


@dataclass
class Plan:
    workers: Bundle
    actors: Optional[Bundle]  # None in colocated mode (or with no sources)
    memory_note: str = ""     # how the memory requests were chosen (for the error messages)

    @property
    def bundles(self) -> list[Bundle]:
        return [b for b in (self.workers, self.actors) if b is not None and b.count]

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.resources.items():
                out[k] = out.get(k, 0.0) + v * b.count
        return out

    def describe(self) -> str:
        return " + ".join(b.describe() for b in self.bundles) + f" = {_fmt(self.total())}"

    @property
    def worker_threads(self) -> int:
        return max(1, int(self.workers.resources.get("CPU", 1)))

    @property
    def actor_threads(self) -> int:
        return max(1, int(self.actors.resources.get("CPU", 1))) if self.actors else 1


def _quantity_text(key: str, v: float) -> str:
    return f"{v / GIB:.2f} GiB" if key == MEMORY else f"{v:g}"


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_quantity_text(k, v)}" for k, v in sorted(res.items()) if v) + "}"


def _quantity(x: float) -> float:
    """Ray takes fractions below 1 and whole numbers above."""
    return float(math.floor(x + EPS)) if x >= 1 else math.floor(x * 100 + EPS) / 100


def _memory(explicit_gb: Optional[float], estimated: int, use_estimate: bool) -> dict[str, float]:
    """{"memory": bytes} to request, or {} (0 GB asked for, or no estimate to use)."""
    n = explicit_gb * GIB if explicit_gb is not None else (estimated if use_estimate else 0)
    return {MEMORY: float(math.ceil(n))} if n > 0 else {}


def plan_resources(cluster: ClusterConfig, n_sources: int, free: dict[str, float], memory=None) -> Plan:
    """Choose per-actor resources; explicit values are kept, auto CPUs share the free CPUs.
    `memory`: a distributed.memory.MemoryEstimate for the memory requests that the cluster
    section leaves unset (ignored when `free` reports no memory)."""
    for key in ("cpus_per_worker", "gpus_per_worker", "cpus_per_source_actor", "gpus_per_source_actor"):
        v = getattr(cluster, key)
        if v is not None and v > 1 and abs(v - round(v)) > EPS:
            raise ConfigError(f"cluster.{key}={v:g}: Ray takes fractions below 1 and whole numbers above; "
                              f"use {math.floor(v):g} or {math.ceil(v):g}")
    served = cluster.sources_mode == "served" and n_sources > 0
    n_workers, n_actors = cluster.workers, (n_sources * cluster.source_actors if served else 0)
    w_cpu, a_cpu = cluster.cpus_per_worker, cluster.cpus_per_source_actor if served else None
    fixed = (w_cpu or 0.0) * n_workers + (a_cpu or 0.0) * n_actors
    weight = (n_workers if w_cpu is None else 0) + (ACTOR_SHARE * n_actors if a_cpu is None and served else 0)
    if weight:
        budget = free.get("CPU", 0.0) - fixed
        unit = budget / weight
        unit = max(unit, MIN_CPU)  # nothing left: check_placement then reports the shortfall
        if w_cpu is None:
            w_cpu = _quantity(unit)
        if a_cpu is None and served:
            a_cpu = max(MIN_CPU, _quantity(unit * ACTOR_SHARE))
        w_cpu = max(MIN_CPU, w_cpu)
    use_estimate = memory is not None and MEMORY in free
    worker = {"CPU": w_cpu, **({"GPU": cluster.gpus_per_worker} if cluster.gpus_per_worker else {}),
              **_memory(cluster.memory_per_worker_gb, memory.worker if memory else 0, use_estimate),
              **cluster.worker_resources}
    actors = None
    if served:
        actors = Bundle("source actors", n_actors,
                        {"CPU": a_cpu, **({"GPU": cluster.gpus_per_source_actor} if cluster.gpus_per_source_actor
                                          else {}),
                         **_memory(cluster.memory_per_source_actor_gb, memory.actor if memory else 0, use_estimate),
                         **cluster.source_resources})
    note = ""
    if use_estimate:
        set_gb = [k for k in ("memory_per_worker_gb", "memory_per_source_actor_gb") if getattr(cluster, k) is not None]
        note = f"memory estimated per process: {memory.describe()}" + (
            f" (replaced by cluster.{' and cluster.'.join(set_gb)})" if set_gb else "")
    return Plan(Bundle("workers", n_workers, worker), actors, note)


def _fits(res: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + EPS >= v for k, v in res.items() if v)


def _lacking(res: dict[str, float], nodes: list[dict[str, float]]) -> list[str]:
    """The resources of `res` that no node has enough of."""
    return [k for k, v in res.items() if v and not any(n.get(k, 0.0) + EPS >= v for n in nodes)]


def memory_hint(plan: Plan, short: list[str]) -> str:
    if MEMORY not in short:
        return ""
    return ("; for memory, lower cluster.workers or data.batch_size (or method.T), or set "
            "cluster.memory_per_worker_gb / memory_per_source_actor_gb" + (f" ({plan.memory_note})"
                                                                           if plan.memory_note else ""))


def check_placement(plan: Plan, free: dict[str, float], total: dict[str, float],
                    nodes: list[dict[str, float]]) -> None:
    """ConfigError unless the plan fits what is free, every single actor fits on some node,
    and all of them pack onto the nodes together (first fit, largest first)."""
    need = plan.total()
    short = [k for k, v in need.items() if v > free.get(k, 0.0) + EPS]
    per_node = "; ".join(_fmt(n) for n in nodes)
    if short:
        have = ", ".join(f"{k}: {_quantity_text(k, free.get(k, 0.0))} free of {_quantity_text(k, total.get(k, 0.0))}"
                         for k in sorted(need))
        raise ConfigError(
            f"cannot place the job: it requests {plan.describe()}, but the cluster has {{{have}}} "
            f"(short of {', '.join(sorted(short))}); lower cluster.workers or the cluster.*_per_worker / "
            f"*_per_source_actor quantities, use sources_mode=colocated, or add nodes"
            + (f"; per node: {per_node}" if len(nodes) > 1 else "") + memory_hint(plan, short))
    if not nodes:
        return
    for b in plan.bundles:
        if not any(_fits(b.resources, n) for n in nodes):
            raise ConfigError(
                f"cannot place the job: no single node can hold one of the {b.what} ({_fmt(b.resources)}); "
                f"the nodes have: {per_node}" + memory_hint(plan, _lacking(b.resources, nodes)))
    left = [dict(n) for n in nodes]
    items = sorted((b for b in plan.bundles for _ in range(b.count)), key=lambda b: _weight(b.resources, total),
                   reverse=True)
    for b in items:
        node = next((n for n in left if _fits(b.resources, n)), None)
        if node is None:
            raise ConfigError(
                f"cannot place the job: {plan.describe()} fit the cluster's totals but not onto its nodes "
                f"together; the nodes have: {per_node}; lower cluster.workers or the per-worker quantities, "
                f"or add nodes" + memory_hint(plan, _lacking(b.resources, left)))
        for k, v in b.resources.items():
            node[k] = node.get(k, 0.0) - v


def _weight(res: dict[str, float], total: dict[str, float]) -> float:
    """The largest share of the cluster that one actor takes of any resource (packing order)."""
    return max((v / total[k] for k, v in res.items() if total.get(k)), default=0.0)
