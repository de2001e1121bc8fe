"""Turn a validated job into the objects of one training process: data, sources, student, step.

Kept separate from the loop so the local trainer, the Ray worker and the benchmarks build
exactly the same thing from the same job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from l2t_dist.config import JobConfig
from l2t_dist.errors import ConfigError
from l2t_dist.sources.colocated import LoadedSource, default_taps, load_sources
from l2t_dist.sources.feeder import TapRequest


@dataclass
class Trainee:
    """Everything the loop touches: the student θ, the objective (φ inside) and the stepper,
    and what each source must compute per batch (`requests`, by source name; sources that
    no pair uses are absent)."""

    target: torch.nn.Module
    objective: object
    step: object
    sources: list[LoadedSource]
    requests: dict[str, TapRequest]
    pairs: list


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_trainee(job: JobConfig, num_classes: int, device: torch.device,
                  sources: Optional[list[LoadedSource]] = None, parallel=None,
                  target_weights: bool = True) -> Trainee:
    """Build target, pairs, student, objective and step; `sources` may be passed in pre-loaded.
    `parallel`: the strategy (train/parallel.py) whose reductions the step uses (see L2TStep)
    and which may synchronise the student's batch norm; None: one process. `target_weights`:
    load target.checkpoint when the job names one (False: a weightless skeleton, validate.py)."""
    from l2t_dist.bilevel import SGDHyper
    from l2t_dist.method import L2TStep, TransferObjective, TransferStudent, get_method, resolve_pairs, tap_infos
    from l2t_dist.models import build_model

    sources = load_sources(job.sources, device) if sources is None else sources
    target = build_model(job.target.arch, num_classes)
    if job.target.checkpoint and target_weights:
        from l2t_dist.train.target_init import load_target_checkpoint

        load_target_checkpoint(target, job.target.arch, job.target.checkpoint, job.target.allow_unsafe_pickle)
    size = job.data.image_size
    method = get_method(job.method.name)
    pairs: list = []
    if method.uses_pairs:
        target_taps = target.resolve_taps(job.target.taps) if job.target.taps else default_taps(target)
        spec = job.method.resolved_pairs()
        explicit = isinstance(spec, list)
        # Presets pair the offered taps; an explicit list may name any tap of either model.
        offered = {s.name: [t for t in tap_infos(s.model.tap_shapes(size)) if explicit or t.name in s.taps]
                   for s in sources}
        target_infos = [t for t in tap_infos(target.tap_shapes(size)) if explicit or t.name in target_taps]
        if explicit:
            spec = [_resolve_explicit(entry, sources, target) for entry in spec]
        pairs = resolve_pairs(spec, offered, target_infos)
    source_classes = sources[0].model.num_classes if method.extra_head else None
    student = TransferStudent(target, method, pairs, source_classes=source_classes).to(device)
    if parallel is not None:
        parallel.prepare_model(student)
    objective = TransferObjective(student, beta=job.method.beta, where=job.method.where)
    if objective.meta is not None:
        objective.meta.to(device)
    needed = objective.needed_source_taps()
    requests = {s.name: TapRequest(tuple(needed.get(s.name, ())), method.source_logits) for s in sources
                if needed.get(s.name) or method.source_logits}
    hp = SGDHyper(lr=job.optim.lr, momentum=job.optim.momentum, weight_decay=job.optim.weight_decay)
    step = L2TStep(objective, hp, T=job.method.T, meta_lr=job.meta.lr, meta_weight_decay=job.meta.weight_decay,
                   meta_interval=job.method.meta_interval, mode=job.method.hypergrad,
                   **(dict(reduce_fn=parallel.reduce_grads, lookahead_sync=parallel.lookahead_sync,
                           loss_scale=parallel.loss_scale) if parallel is not None else {}))
    return Trainee(target, objective, step, sources, requests, pairs)


def _resolve_explicit(entry, sources: list[LoadedSource], target) -> list[str]:
    """["tin:4", "2"] -> ["tin:block4", "stage2"]: indices become the models' tap names."""
    name, _, tap = str(entry[0]).partition(":")
    by_name = {s.name: s for s in sources}
    if name not in by_name:
        raise ConfigError(f"explicit pair {entry!r}: unknown source {name!r}; sources: {', '.join(by_name)}")
    return [f"{name}:{by_name[name].model.resolve_taps([tap])[0]}", target.resolve_taps([str(entry[1])])[0]]
