"""Resource planning for `--backend ray`, checked before anything is started (no Ray here).

Ray waits forever for resources that never come (ENV.md: two 1-CPU workers and a 1-CPU
actor hang on 2 CPUs). So the command chooses every quantity itself, fractional CPUs
included, compares the plan with what the cluster has free, and fails at once with a message
that shows both sides. Auto quantities (cpus_per_worker / cpus_per_source_actor left unset)
share the free CPUs in the ratio 2:1 between a worker and a source actor.
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


@dataclass
class Bundle:
    """`count` Ray actors that each need `resources`."""

    what: str
    count: int
    resources: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.count} {self.what} x {_fmt(self.resources)}"


@dataclass
class Plan:
    workers: Bundle
    actors: Optional[Bundle]  # None in colocated mode (or with no sources)

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


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items()) if v) + "}"


def _quantity(x: float) -> float:
    """Ray takes fractions below 1 and whole numbers above."""
    return float(math.floor(x + EPS)) if x >= 1 else math.floor(x * 100 + EPS) / 100


def plan_resources(cluster: ClusterConfig, n_sources: int, free: dict[str, float]) -> Plan:
    """Choose per-actor resources; explicit values are kept, auto ones share the free CPUs."""
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
    worker = {"CPU": w_cpu, **({"GPU": cluster.gpus_per_worker} if cluster.gpus_per_worker else {}),
              **cluster.worker_resources}
    actors = None
    if served:
        actors = Bundle("source actors", n_actors,
                        {"CPU": a_cpu, **({"GPU": cluster.gpus_per_source_actor} if cluster.gpus_per_source_actor
                                          else {}), **cluster.source_resources})
    return Plan(Bundle("workers", n_workers, worker), actors)


def check_placement(plan: Plan, free: dict[str, float], total: dict[str, float],
                    nodes: list[dict[str, float]]) -> None:
    """ConfigError unless the plan fits what is free, and every single actor fits on some node."""
    need = plan.total()
    short = [k for k, v in need.items() if v > free.get(k, 0.0) + EPS]
    if short:
        have = ", ".join(f"{k}: {free.get(k, 0.0):g} free of {total.get(k, 0.0):g}" for k in sorted(need))
        raise ConfigError(
            f"cannot place the job: it requests {plan.describe()}, but the cluster has {{{have}}} "
            f"(short of {', '.join(sorted(short))}); lower cluster.workers or the cluster.*_per_worker / "
            f"*_per_source_actor quantities, use sources_mode=colocated, or add nodes")
    for b in plan.bundles:
        if nodes and not any(all(n.get(k, 0.0) + EPS >= v for k, v in b.resources.items() if v) for n in nodes):
            raise ConfigError(
                f"cannot place the job: no single node can hold one of the {b.what} ({_fmt(b.resources)}); "
                f"the nodes have: " + "; ".join(_fmt(n) for n in nodes))
