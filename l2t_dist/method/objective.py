"""The student θ, the meta-networks φ, and the losses of one batch for every method.

`TransferObjective` is what the trainer holds: it builds regressors (θ) and meta-networks
(φ) for a target model and a pair list, turns a batch plus source features into a `Batch`
(source maps resized once, λ·w computed once with their graph to φ), and hands out the real
step's loss and, for the L2T methods, the pieces of the look-ahead (`inner`, `task_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2t_dist.bilevel import FactoredObjective, InnerObjective
from l2t_dist.errors import ConfigError, TrainingError
from l2t_dist.method.functional import FunctionalModule
from l2t_dist.method.losses import at_loss, fm_weights, kd_loss, teacher_probs
from l2t_dist.method.pairs import PairSpec
from l2t_dist.method.transfer import (MatchingRegressor, WhatNetwork, WhereNetwork, matching_terms, pair_weights,
                                      pool, resize_to, weighted_matching_loss)

METHODS = ("scratch", "lwf", "at", "fm", "l2t_w", "l2t_ww")
MATCHING = ("fm", "l2t_w", "l2t_ww")   # regressors + (weighted) feature matching
META = ("l2t_w", "l2t_ww")             # meta-learned weights: the bilevel step runs


class TransferStudent(nn.Module):
    """θ as one module: the target network, one regressor per pair, LwF's extra head."""

    def __init__(self, target: nn.Module, method: str, pairs: Sequence[PairSpec] = (),
                 source_classes: Optional[int] = None):
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
        if method in ("at",) + MATCHING and not pairs:
            raise ConfigError(f"method {method!r} needs at least one (source tap, target tap) pair")
        if method == "lwf" and not source_classes:
            raise ConfigError("method 'lwf' needs the source's number of classes for its extra head")
        self.target = target
        self.method = method
        self.pairs = list(pairs) if method in ("at",) + MATCHING else []
        self.regressors = nn.ModuleList(
            MatchingRegressor(p.target_channels, p.source_channels) for p in self.pairs) if method in MATCHING \
            else nn.ModuleList()
        self.head = nn.Linear(target.embedding_dim, source_classes) if method == "lwf" else None
        self.taps = list(dict.fromkeys(p.target_tap for p in self.pairs))
        # Pairs that share a target tap form a group: their regressors run as one fused 1x1
        # convolution and their distances as one tensor, 5 kernels where there would be 15.
        self.groups = [[i for i, p in enumerate(self.pairs) if p.target_tap == tap] for tap in self.taps]

    def forward(self, x: Tensor, logits: bool = True, maps: bool = True):
        """(logits or None, maps, LwF head output or None). Maps: per group of pairs, the
        regressed target map (channels of the group's pairs concatenated); for AT, per pair,
        the raw target map."""
        taps = self.taps if maps else []
        emb = self.head is not None and logits
        out, feats = self.target.forward_taps(x, taps=taps, logits=logits, embedding=emb)
        if not maps:
            per = []
        elif len(self.regressors):
            per = [self._regress(feats[tap], group) for tap, group in zip(self.taps, self.groups)]
        else:
            per = [feats[p.target_tap] for p in self.pairs]
        return out, per, (self.head(feats["embedding"]) if emb else None)

    def _regress(self, f: Tensor, group: list[int]) -> Tensor:
        if len(group) == 1:
            return self.regressors[group[0]](f)
        weight = torch.cat([self.regressors[i].weight for i in group])
        bias = torch.cat([self.regressors[i].bias for i in group])
        return F.conv2d(f, weight, bias)


class MetaNetworks(nn.Module):
    """φ: a what-network per pair and, for L2T-ww, a where-network per pair."""

    def __init__(self, pairs: Sequence[PairSpec], where: Optional[str]):
        super().__init__()
        self.what = nn.ModuleList(WhatNetwork(p.source_channels) for p in pairs)
        self.where = nn.ModuleList(WhereNetwork(p.source_channels, where) for p in pairs) if where else None

    def forward(self, pooled: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per pair: (1/B)·λ·w (B, C_m), and λ (B,); λ = 1 without where-networks."""
        lams, weights = [], []
        for i, f in enumerate(pooled):
            w = self.what[i](f)
            lam = self.where[i](f) if self.where is not None else torch.ones_like(f[:, 0])
            lams.append(lam)
            weights.append(pair_weights(lam, w))
        return weights, lams


@dataclass
class Batch:
    """One batch, prepared once: everything the real step and the look-ahead share.

    For the matching methods `sources` and `weights` are per group of pairs (see
    `TransferStudent.groups`), channels concatenated in pair order; for AT, per pair.
    """

    x: Tensor
    y: Tensor
    sources: list[Tensor] = field(default_factory=list)       # resized to the target size
    raw_sources: list[Tensor] = field(default_factory=list)   # per pair, as the source gave it
    weights: list[Tensor] = field(default_factory=list)       # (1/B)·λ·w; graph to φ for L2T
    lams: list[Tensor] = field(default_factory=list)          # per pair λ (B,), for summaries
    teacher: Optional[Tensor] = None                          # LwF soft targets


class TransferObjective:
    """Losses of one method for a student; `theta_params()` are trained by SGD, `phi_params()` by Adam."""

    def __init__(self, student: TransferStudent, beta: float = 0.5, where: str = "relu6",
                 lwf_source: Optional[str] = None):
        if beta < 0:
            raise ConfigError(f"beta must be >= 0, got {beta}")
        self.student = student
        self.method = student.method
        self.beta = float(beta)
        self.lwf_source = lwf_source  # LwF: whose logits to mimic; None = the only source given
        self.meta = MetaNetworks(student.pairs, where if self.method == "l2t_ww" else None) \
            if self.method in META else None
        self.functional = FunctionalModule(student, [n for n, _ in self._named_theta()])

    # ---- parameters and source needs
    def _named_theta(self):
        return [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]

    def theta_params(self) -> list[nn.Parameter]:
        """θ in a fixed order (the order of `functional`'s arguments): trainable student parameters."""
        return [p for _, p in self._named_theta()]

    def phi_params(self) -> list[nn.Parameter]:
        return list(self.meta.parameters()) if self.meta is not None else []

    @property
    def has_meta(self) -> bool:
        return self.meta is not None

    def needed_source_taps(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in self.student.pairs:
            taps = out.setdefault(p.source, [])
            if p.source_tap not in taps:
                taps.append(p.source_tap)
        return out

    @property
    def needs_source_logits(self) -> bool:
        return self.method == "lwf"

    # ---- per batch
    def prepare(self, x: Tensor, y: Tensor, source_feats: Mapping[str, Mapping[str, Tensor]]) -> Batch:
        """Resize the source maps and run the meta-networks once for this batch (graph to φ kept)."""
        batch = Batch(x=x, y=y)
        pairs, groups = self.student.pairs, self.student.groups
        dtype = next(self.student.parameters()).dtype  # sources may arrive in bf16/fp16 transport
        pooled: dict[tuple[str, str], Tensor] = {}
        for p in pairs:
            s = _lookup(source_feats, p.source, p.source_tap).to(dtype)
            batch.raw_sources.append(s)
            if (p.source, p.source_tap) not in pooled:
                pooled[(p.source, p.source_tap)] = pool(s)
        if self.method == "at":
            batch.sources = list(batch.raw_sources)
        elif self.method in MATCHING:
            batch.sources = [_cat([resize_to(batch.raw_sources[i], pairs[i].target_size) for i in g]) for g in groups]
            if self.meta is not None:
                weights, batch.lams = self.meta([pooled[(p.source, p.source_tap)] for p in pairs])
            else:
                weights = [fm_weights(x.shape[0], p.source_channels, x) for p in pairs]
            batch.weights = [_cat([weights[i] for i in g]) for g in groups]
        if self.method == "lwf":
            name = self.lwf_source or (next(iter(source_feats)) if len(source_feats) == 1 else None)
            if name is None or "logits" not in source_feats.get(name, {}):
                raise TrainingError(f"method 'lwf' needs the logits of source {name or '(the only one)'} "
                                    f"(source features {{name: {{'logits': ...}}}}); got sources {list(source_feats)}")
            batch.teacher = teacher_probs(source_feats[name]["logits"].to(dtype))
        return batch

    def real_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """L_org + β·L_transfer through the module itself (updates the BN running stats); φ constant."""
        maps = self.method in ("at",) + MATCHING
        logits, maps, head = self.student(batch.x, logits=True, maps=maps)
        ce = F.cross_entropy(logits, batch.y)
        if self.method in MATCHING:
            transfer = weighted_matching_loss(matching_terms(maps, self._sources_for(batch, maps)),
                                              [w.detach() for w in batch.weights])
        elif self.method == "at":
            transfer = at_loss(maps, batch.sources)
        elif self.method == "lwf":
            transfer = kd_loss(head, batch.teacher)
        else:
            transfer = ce.new_zeros(())
        return ce + self.beta * transfer, {"ce": ce, "transfer": transfer}, logits

    def inner(self, batch: Batch) -> InnerObjective:
        """β·L_wfm(θ) for the look-ahead (pure function of θ; the weights carry φ)."""
        if self.meta is None:
            raise ConfigError(f"method {self.method!r} has no meta-parameters, so no look-ahead")
        x = batch.x

        def terms(params):
            _, maps, _ = self.functional(params, x, logits=False, maps=True)
            return matching_terms(maps, self._sources_for(batch, maps))

        return FactoredObjective(terms, [self.beta * w for w in batch.weights])

    def task_loss(self, batch: Batch):
        """L_org(θ) on this batch, as a pure function of θ (the look-ahead's last step and meta-loss)."""
        x, y = batch.x, batch.y

        def loss(params):
            logits, _, _ = self.functional(params, x, logits=True, maps=False)
            return F.cross_entropy(logits, y)

        return loss

    def pair_summary(self, batch: Batch) -> dict[str, float]:
        """Mean λ per pair (the where-network's choice), for tracking."""
        return {p.name: float(l.detach().mean()) for p, l in zip(self.student.pairs, batch.lams)}

    def _sources_for(self, batch: Batch, maps: Sequence[Tensor]) -> list[Tensor]:
        # Resized once in prepare(); redo it only if the input size differs from the one the
        # pairs were built for.
        out = []
        for s, m, group in zip(batch.sources, maps, self.student.groups):
            if s.shape[-2:] != m.shape[-2:]:
                s = _cat([resize_to(batch.raw_sources[i], m.shape[-2:]) for i in group])
            out.append(s)
        return out


def _cat(ts: Sequence[Tensor]) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=1)


def _lookup(source_feats, source: str, tap: str) -> Tensor:
    try:
        return source_feats[source][tap]
    except KeyError:
        have = {k: sorted(v) for k, v in source_feats.items()}
        raise TrainingError(f"source features lack {source}:{tap} (have {have}); the source must compute "
                            "every tap in objective.needed_source_taps()") from None
