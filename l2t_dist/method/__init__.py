"""L2T-ww and the paper's baselines as losses and one training iteration (torch only).

```python
from l2t_dist.method import resolve_pairs, tap_infos, TransferStudent, TransferObjective, L2TStep
from l2t_dist.bilevel import SGDHyper
pairs = resolve_pairs("all_to_all", {"src": tap_infos(src.tap_shapes(32))}, tap_infos(target.tap_shapes(32)))
student = TransferStudent(target, "l2t_ww", pairs)             # θ: target + regressors (+ LwF head)
objective = TransferObjective(student, beta=0.5, where="relu6")   # φ: what/where nets per pair
objective.needed_source_taps()   # {"src": [taps]}: what the sources must compute
step = L2TStep(objective, SGDHyper(lr, momentum, wd), T=2, meta_lr=1e-4, meta_weight_decay=1e-4,
               meta_interval=1, mode="keep", reduce_fn=None)   # reduce_fn: in-place all-reduce hook
metrics = step(x, y, source_feats)   # source_feats: {source: {tap: (B,C,H,W), "logits": ...}}
#  -> {"loss", "ce", "transfer", "acc"} (+ "meta_loss" on meta iterations); step(..., meta=False) skips it
step.set_lr(lr); step.state_dict(); step.load_state_dict(state)
step.timings = {}   # optional: seconds per phase (real, step1.., meta_loss, reverse.., adam)
objective.pair_summary(objective.prepare(x, y, source_feats))   # {pair name: mean λ}
```
θ and φ live in `objective.student` and `objective.meta` (save their state_dicts); the step
holds the momentum buffers, Adam's state and the iteration counter. Pairs sharing a target tap
run as one fused regressor convolution (`student.groups`); θ keeps one regressor per pair.
Methods: scratch, lwf, at, fm (real step only), l2t_w (what only, λ = 1), l2t_ww (what + where).
"""

from l2t_dist.method.functional import FunctionalModule, preserved_buffers
from l2t_dist.method.losses import at_loss, attention_map, fm_weights, kd_loss, teacher_probs
from l2t_dist.method.objective import META, METHODS, Batch, MetaNetworks, TransferObjective, TransferStudent
from l2t_dist.method.pairs import PRESETS, PairSpec, TapInfo, resolve_pairs, tap_infos
from l2t_dist.method.step import L2TStep
from l2t_dist.method.transfer import (WHERE_TYPES, MatchingRegressor, WhatNetwork, WhereNetwork, matching_terms,
                                      pair_weights, pool, resize_to, weighted_matching_loss)

__all__ = [
    "FunctionalModule", "preserved_buffers", "at_loss", "attention_map", "fm_weights", "kd_loss", "teacher_probs",
    "META", "METHODS", "Batch", "MetaNetworks", "TransferObjective", "TransferStudent", "PRESETS", "PairSpec",
    "TapInfo", "resolve_pairs", "tap_infos", "L2TStep", "WHERE_TYPES", "MatchingRegressor", "WhatNetwork",
    "WhereNetwork", "matching_terms", "pair_weights", "pool", "resize_to", "weighted_matching_loss",
]
