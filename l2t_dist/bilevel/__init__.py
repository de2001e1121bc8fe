"""The look-ahead and the exact hyper-gradient of L2T-ww (torch only).

```python
from l2t_dist.bilevel import SGDHyper, sgd_step_, hypergradient, InnerObjective
hp = SGDHyper(lr=0.1, momentum=0.9, weight_decay=1e-4)
sgd_step_(params, bufs, grads, hp)        # in place, consumes grads; a None grad counts as zero (wd, momentum act)
new = sgd_update(params, bufs, grads, hp) # out of place for params, bufs in place
meta_loss, grads_phi = hypergradient(params0, bufs0, phi, inner, outer_loss, T, hp, mode="keep")
#   inner: InnerObjective (loss(params), or terms(params) + weights() for the factored form);
#   outer_loss(params) -> scalar: the task loss, also the loss of the look-ahead's last step;
#   params0/bufs0 are never written; mode "keep" (fast) or "replay" (one graph in memory);
#   sync=avg_fn (data parallel, meta_sync global): every rank walks the global-batch look-ahead.
lookahead_loss(params0, bufs0, inner, outer_loss, T, hp)       # the meta-loss alone
unrolled_hypergradient(...)                                     # brute-force reference, tests only
```
"""

from l2t_dist.bilevel.hypergrad import MODES, check_lookahead, grads_of, hypergradient, leaves, lookahead_loss
from l2t_dist.bilevel.objective import FactoredObjective, FunctionObjective, InnerObjective, ScaledObjective
from l2t_dist.bilevel.sgd import SGDHyper, sgd_step_, sgd_update, zero_bufs
from l2t_dist.bilevel.unrolled import unrolled_hypergradient

__all__ = [
    "MODES", "check_lookahead", "SGDHyper", "sgd_step_", "sgd_update", "zero_bufs", "hypergradient", "lookahead_loss",
    "unrolled_hypergradient", "InnerObjective", "FactoredObjective", "FunctionObjective", "grads_of", "leaves",
    "ScaledObjective",
]
