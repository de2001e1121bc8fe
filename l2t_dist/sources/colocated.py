"""Frozen sources run inside the training process (no Ray): the colocated mode.

Each source is loaded once and computes only the taps that the pairs use, once per batch.
We use `no_grad` rather than `inference_mode`: the features feed the meta-networks, whose
backward must save them, and inference tensors cannot be saved for backward.
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
    needed: list[str] = field(default_factory=list)  # the taps the chosen pairs actually use
    want_logits: bool = False            # LwF mimics the source's own outputs


def default_taps(model) -> list[str]:
    """The end of each stage: the last tap at each distinct stride (paper: 4, 9, 14 of ResNet32)."""
    last: dict[int, str] = {}
    for tap in model.taps:
        last[tap.stride] = tap.name
    return list(last.values())


def load_sources(configs: list[SourceConfig], device: torch.device) -> list[LoadedSource]:
    from l2t_dist.sources.zoo import load_source

    out = []
    for cfg in configs:
        model, meta = load_source(cfg.checkpoint, cfg.arch, num_classes=cfg.num_classes)
        taps = model.resolve_taps(cfg.taps) if cfg.taps else default_taps(model)
        out.append(LoadedSource(cfg.name, cfg.arch, model.to(device).eval(), taps, meta))
    return out


class SourceBank:
    """Computes every source's needed taps (and logits for LwF) for a batch of images."""

    def __init__(self, sources: list[LoadedSource]):
        self.sources = sources

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for src in self.sources:
            logits, feats = src.model.forward_taps(x, src.needed, logits=src.want_logits)
            if src.want_logits:
                feats["logits"] = logits
            out[src.name] = feats
        return out
