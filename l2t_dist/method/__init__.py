"""L2T-ww and the paper's baselines as losses and one training iteration.

```python
from l2t_dist.method import resolve_pairs, tap_infos, get_method, TransferStudent, TransferObjective, L2TStep
from l2t_dist.bilevel import SGDHyper
method = get_method("l2t_ww")   # declarations: method.default_pairs, .meta_networks, .needs_sources, ...
pairs = resolve_pairs(method.default_pairs, {"src": tap_infos(src.tap_shapes(32))}, tap_infos(target.tap_shapes(32)))
student = TransferStudent(target, method, pairs)                  # θ: target + regressors (+ LwF head)
objective = TransferObjective(student, beta=0.5, where="relu6")   # φ: what/where nets per pair
objective.needed_source_taps()   # {"src": [taps]}: what the sources must compute
step = L2TStep(objective, SGDHyper(lr, momentum, wd), T=2, meta_lr=1e-4, meta_weight_decay=1e-4,
               meta_interval=1, mode="keep", reduce_fn=None)   # reduce_fn: in-place all-reduce hook
metrics = step(x, y, source_feats)   # source_feats: {source: {tap: (B,C,H,W), "logits": ...}}
#  -> {"loss", "ce", "transfer", "acc"} (+ "meta_loss" on meta iterations); step(..., meta=False) skips it
step.set_lr(lr); step.state_dict(); step.load_state_dict(state)
step.timings = {}   # optional: seconds per phase (real, step1.., meta_loss, reverse.., adam)
```
θ and φ live in `objective.student` and `objective.meta` (save their state_dicts); the step
holds the momentum buffers, Adam's state and the iteration counter. Pairs sharing a target tap
run as one fused regressor convolution (`student.groups`); θ keeps one regressor per pair.
Methods (`methods.py`, one class each): scratch, finetune (scratch from target.checkpoint), lwf, at,
fm (real step only), l2t_w (what only, λ = 1), l2t_ww (what + where).

Names are imported on first use, so that the job schema can read the method registry
(`l2t_dist.method.methods`) without importing torch.
"""

from l2t_dist.lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(__name__, {
    "functional": ("FunctionalModule", "preserved_buffers"),
    "losses": ("at_loss", "attention_map", "fm_weights", "kd_loss", "teacher_probs"),
    "methods": ("REGISTRY", "Method", "get_method", "method_names", "register"),
    "objective": ("Batch", "MetaNetworks", "TransferObjective", "TransferStudent"),
    "pairs": ("PRESETS", "PairSpec", "TapInfo", "resolve_pairs", "tap_infos"),
    "step": ("L2TStep",),
    "transfer": ("WHERE_TYPES", "MatchingRegressor", "WhatNetwork", "WhereNetwork", "cat_channels",
                 "matching_terms", "pair_weights", "pool", "resize_to", "weighted_matching_loss"),
})
