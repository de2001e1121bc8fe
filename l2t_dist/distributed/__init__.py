"""Data-parallel L2T-ww on Ray: served sources, Ray Train workers, resource planning.

Only the modules that say so import Ray (serving, worker, launcher), and only when called
from `l2t-dist train --backend ray`; `allreduce` and `resources` are plain PyTorch/Python,
and the data-parallel strategy (train/parallel.py) also runs under torchrun or a test harness.
See docs/distributed.md for the semantics.
"""
