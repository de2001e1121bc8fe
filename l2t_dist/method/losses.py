"""Transfer losses of the paper's baselines (the L2T methods' loss lives in transfer.py).

- FM (FitNets-style): weighted matching with λ = 1 and w = 1/C, a plain mean over channels.
- AT (Zagoruyko & Komodakis): at(f) = normalize(mean_c f², flattened); Σ_pairs mean (at(S) − at(T))²,
  on the raw target map (no regressor), the source resized to the target's size.
- LwF: knowledge distillation, temperature 2, from an extra head on the target's pooled
  embedding to the source's own softmax, scaled by T² so gradients keep their size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from l2t_dist.method.transfer import resize_to

KD_TEMPERATURE = 2.0


def fm_weights(batch: int, channels: int, like: Tensor) -> Tensor:
    """Constant weights (1/B)·(1/C): Σ(weights·D) = mean_b mean_c D."""
    return torch.full((batch, channels), 1.0 / (batch * channels), dtype=like.dtype, device=like.device)


def attention_map(f: Tensor) -> Tensor:
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


def at_loss(target_maps: Sequence[Tensor], source_maps: Sequence[Tensor]) -> Tensor:
    total = 0.0
    for t, s in zip(target_maps, source_maps):
        total = total + (attention_map(resize_to(s, t.shape[-2:])) - attention_map(t)).pow(2).mean()
    return total


def kd_loss(student_logits: Tensor, teacher_probs: Tensor, temperature: float = KD_TEMPERATURE) -> Tensor:
    """KL(teacher ‖ student) at temperature T, ×T² (same gradient as soft cross-entropy)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p, teacher_probs, reduction="batchmean") * temperature ** 2


def teacher_probs(source_logits: Tensor, temperature: float = KD_TEMPERATURE) -> Tensor:
    return F.softmax(source_logits / temperature, dim=1)
