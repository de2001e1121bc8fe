"""Frozen sources loaded for a job: each checkpoint once, with the taps it offers.

They run inside the training process (sources/feeder.py's ColocatedFeeder) or inside a Ray
actor (distributed/serving.py); either way only the taps that the pairs use are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from l2t_dist.config import SourceConfig


@dataclass
class LoadedSource:
    name: str
    arch: str
    model: torch.nn.Module
    taps: list[str]                      # the taps offered for matching (resolved names)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        # A module-path tap (tv:/timm: models) exists once resolved: a served source's skeleton
        # model in a worker must know the taps that its actor resolved.
        self.model.resolve_taps(self.taps)


def default_taps(model) -> list[str]:
    """The end of each stage: the last tap at each distinct stride (paper: 4, 9, 14 of ResNet32)."""
    last: dict[int, str] = {}
    for tap in model.taps:
        last[tap.stride] = tap.name
    return list(last.values())


def offered_taps(model, specs) -> list[str]:
    """The taps a model offers for matching: `specs` (indices or names) resolved, else the
    end of each stage. Shared by the loader and by `l2t-dist job`'s checks (l2t_dist/validate.py)."""
    return model.resolve_taps(specs) if specs else default_taps(model)


def load_sources(configs: list[SourceConfig], device: torch.device) -> list[LoadedSource]:
    from l2t_dist.sources.zoo import load_source

    out = []
    for cfg in configs:
        model, meta = load_source(cfg.checkpoint, cfg.arch, num_classes=cfg.num_classes,
                                  allow_unsafe_pickle=cfg.allow_unsafe_pickle)
        taps = offered_taps(model, cfg.taps)
        out.append(LoadedSource(cfg.name, cfg.arch, model.to(device).eval(), taps, meta))
    return out
