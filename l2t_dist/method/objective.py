"""The student θ, the meta-networks φ, and the losses of one batch, for any registered method.

`TransferObjective` is what the trainer holds: it builds regressors (θ) and meta-networks
(φ) for a target model, a method (`l2t_dist.method.methods`) and a pair list, turns a batch
plus source features into a `Batch` (source maps resized once, λ·w computed once with their
graph to φ), and hands out the real step's loss and, for methods with meta-networks, the
pieces of the look-ahead (`inner`, `task_loss`). What differs between methods is asked of
the method object; nothing here tests a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2t_dist.bilevel import InnerObjective
from l2t_dist.errors import ConfigError, TrainingError
from l2t_dist.method.functional import FunctionalModule
from l2t_dist.method.methods import Method, get_method
from l2t_dist.method.pairs import PairSpec
from l2t_dist.method.transfer import MatchingRegressor, WhatNetwork, WhereNetwork, pair_weights


class TransferStudent(nn.Module):
    """θ as one module: the target network, one regressor per pair, LwF's extra head."""

    def __init__(self, target: nn.Module, method: Union[str, Method], pairs: Sequence[PairSpec] = (),
                 source_classes: Optional[int] = None):
        super().__init__()
        method = get_method(method)
        if method.uses_pairs and not pairs:
            raise ConfigError(f"method {method.name!r} needs at least one (source tap, target tap) pair")
        if method.extra_head and not source_classes:
            raise ConfigError(f"method {method.name!r} needs the source's number of classes for its extra head")
        # Registration order is θ's order (and the RNG draws of the initialisation): target,
        # regressors, head.
        self.target = target
        self.method = method
        self.pairs = list(pairs) if method.uses_pairs else []
        self.regressors = nn.ModuleList(
            MatchingRegressor(p.target_channels, p.source_channels) for p in self.pairs) if method.regressors \
            else nn.ModuleList()
        self.head = nn.Linear(target.embedding_dim, source_classes) if method.extra_head else None
        self.taps = list(dict.fromkeys(p.target_tap for p in self.pairs))
        # Pairs that share a target tap form a group: their regressors run as one fused 1x1
        # convolution and their distances as one tensor, 5 kernels where there would be 15.
        self.groups = [[i for i, p in enumerate(self.pairs) if p.target_tap == tap] for tap in self.taps]

    def forward(self, x: Tensor, logits: bool = True, maps: bool = True):
        """(logits or None, maps, LwF head output or None). Maps: per group of pairs, the
        regressed target map (channels of the group's pairs concatenated); without
        regressors (AT), per pair, the raw target map."""
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
    """φ: a what-network per pair and, when `where` names a type (L2T-ww), a where-network per pair."""

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

    Fields are filled by the method's `prepare`: for the matching methods `sources` and
    `weights` are per group of pairs (see `TransferStudent.groups`), channels concatenated
    in pair order; for AT, `sources` is per pair.
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
        nets = self.method.meta_networks
        self.meta = MetaNetworks(student.pairs, where if "where" in nets else None) if nets else None
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
    def dtype(self) -> torch.dtype:
        """θ's dtype: source features are cast to it (they may arrive in bf16/fp16 transport)."""
        return next(self.student.parameters()).dtype

    def needed_source_taps(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in self.student.pairs:
            taps = out.setdefault(p.source, [])
            if p.source_tap not in taps:
                taps.append(p.source_tap)
        return out

    # ---- per batch
    def prepare(self, x: Tensor, y: Tensor, source_feats: Mapping[str, Mapping[str, Tensor]]) -> Batch:
        """Look up the pairs' source maps, then let the method prepare its part (graph to φ kept)."""
        dtype = self.dtype
        batch = Batch(x=x, y=y, raw_sources=[_lookup(source_feats, p.source, p.source_tap).to(dtype)
                                             for p in self.student.pairs])
        self.method.prepare(self, batch, source_feats)
        return batch

    def real_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """L_org + β·L_transfer through the module itself (updates the BN running stats); φ constant."""
        logits, maps, head = self.student(batch.x, logits=True, maps=self.method.uses_pairs)
        ce = F.cross_entropy(logits, batch.y)
        transfer = self.method.transfer_loss(self, batch, logits, maps, head)
        return ce + self.beta * transfer, {"ce": ce, "transfer": transfer}, logits

    def inner(self, batch: Batch) -> InnerObjective:
        """β·L_transfer(θ) for the look-ahead (pure function of θ; the weights carry φ)."""
        if self.meta is None:
            raise ConfigError(f"method {self.method.name!r} has no meta-parameters, so no look-ahead")
        return self.method.inner(self, batch)

    def task_loss(self, batch: Batch):
        """L_org(θ) on this batch, as a pure function of θ (the look-ahead's last step and meta-loss)."""
        x, y = batch.x, batch.y

        def loss(params):
            logits, _, _ = self.functional(params, x, logits=True, maps=False)
            return F.cross_entropy(logits, y)

        return loss


def _lookup(source_feats, source: str, tap: str) -> Tensor:
    try:
        return source_feats[source][tap]
    except KeyError:
        have = {k: sorted(v) for k, v in source_feats.items()}
        raise TrainingError(f"source features lack {source}:{tap} (have {have}); the source must compute "
                            "every tap in objective.needed_source_taps()") from None
