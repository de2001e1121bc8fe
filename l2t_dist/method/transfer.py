"""The pieces of L2T-ww's weighted feature matching: regressors, what/where nets, the loss.

L_wfm = mean_b Σ_pairs λ_b Σ_c w_bc D_bc,  D_bc = mean_ij (r_θ(T^n)_bcij − S^m_bcij)².
Only D depends on θ and only λ, w on φ (through the fixed source features): keeping the two
apart gives the hyper-gradient engine the factored form it exploits (see l2t_dist.bilevel).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2t_dist.errors import ConfigError

WHERE_TYPES = ("relu6", "relu", "const")


def resize_to(source: Tensor, size: Sequence[int]) -> Tensor:
    """The source map at the target's spatial size, bilinear with align_corners=False (the paper).

    Computed as two small matrix products with the separable interpolation weights: the same
    numbers as `F.interpolate(..., mode="bilinear")`, but without its CUDA kernel for NCHW,
    which loops over batch and channels inside each output pixel and takes milliseconds on
    small outputs (a quarter of a GPU iteration's device time at 15 pairs).
    """
    size = tuple(int(s) for s in size)
    h, w = source.shape[-2:]
    if (h, w) == size:
        return source
    rows = _interp_matrix(h, size[0], source.dtype, source.device)   # (H_out, H_in)
    cols = _interp_matrix(w, size[1], source.dtype, source.device)   # (W_out, W_in)
    out = source @ cols.T                                             # (B, C, H_in, W_out)
    return (out.transpose(-1, -2) @ rows.T).transpose(-1, -2).contiguous()


_MATRICES: dict = {}


def _interp_matrix(n_in: int, n_out: int, dtype, device) -> Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation (align_corners=False), cached."""
    key = (n_in, n_out, dtype, str(device))
    if key not in _MATRICES:
        basis = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)    # n_in signals, one per input position
        m = F.interpolate(basis, size=n_out, mode="linear", align_corners=False)[:, 0, :].T
        _MATRICES[key] = m.to(dtype=dtype, device=device)
    return _MATRICES[key]


def cat_channels(ts: Sequence[Tensor]) -> Tensor:
    """One tensor for a group of pairs, channels in pair order (no copy for a group of one)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=1)


def pool(source: Tensor) -> Tensor:
    """Global average pool (B, C, H, W) -> (B, C): the meta-networks' input."""
    return source.mean(dim=(2, 3))


class MatchingRegressor(nn.Conv2d):
    """r_θ: a 1x1 convolution from the target's C_n channels to the source's C_m (part of θ)."""

    def __init__(self, target_channels: int, source_channels: int):
        super().__init__(target_channels, source_channels, kernel_size=1)


class WhatNetwork(nn.Module):
    """w: channel importance, softmax over channels of Linear(C_m, C_m) of the pooled source map.

    Zero-initialised, so every channel starts with weight 1/C_m (plain feature matching).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.linear = nn.Linear(channels, channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        return F.softmax(self.linear(pooled), dim=1)


class WhereNetwork(nn.Module):
    """λ: one non-negative weight per sample for a pair.

    relu6 (default) / relu: act(Linear(C_m, 1)) of the pooled source map, bias 1.0 so that
    the pair starts switched on; const: softplus(10·a), one learned scalar, a = 0 at start.
    """

    def __init__(self, channels: int, kind: str = "relu6"):
        super().__init__()
        if kind not in WHERE_TYPES:
            raise ConfigError(f"unknown where-network type {kind!r}; allowed: {', '.join(WHERE_TYPES)}")
        self.kind = kind
        if kind == "const":
            self.a = nn.Parameter(torch.zeros(1))
        else:
            self.linear = nn.Linear(channels, 1)
            nn.init.constant_(self.linear.bias, 1.0)

    def forward(self, pooled: Tensor) -> Tensor:
        if self.kind == "const":
            return F.softplus(10.0 * self.a).expand(pooled.shape[0])
        z = self.linear(pooled).squeeze(1)
        return F.relu6(z) if self.kind == "relu6" else F.relu(z)


def matching_terms(regressed: Sequence[Tensor], sources: Sequence[Tensor]) -> list[Tensor]:
    """D per pair, (B, C_m): mean over space of the squared error; sources already resized."""
    out = []
    for r, s in zip(regressed, sources):
        if r.shape[-2:] != s.shape[-2:]:
            s = resize_to(s, r.shape[-2:])
        out.append((r - s).pow(2).mean(dim=(2, 3)))
    return out


def pair_weights(lam: Tensor, what: Tensor) -> Tensor:
    """(1/B)·λ_b·w_bc, so that Σ(weights·D) = mean_b λ_b Σ_c w_bc D_bc."""
    return lam.unsqueeze(1) * what / what.shape[0]


def weighted_matching_loss(terms: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    """L_wfm = Σ_pairs Σ_bc weights·D (weights from `pair_weights`)."""
    return sum((w * d).sum() for w, d in zip(weights, terms))
