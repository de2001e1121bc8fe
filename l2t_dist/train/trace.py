"""The per-iteration trace (`run.trace=true`): RUN_DIR/trace.jsonl, one line per iteration.

Why: the epoch log is too coarse to pin an algorithm down. The trace holds each iteration's
metrics (loss, meta-loss), the mean λ per pair on the iteration's batch after the update,
and checksums of θ, φ and the momentum buffers, so that a regression test can compare a run
with a recorded one (across refactors, and between one process and data-parallel workers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch


def _sums(tensors) -> list[float]:
    flat = [t.detach().double().reshape(-1) for t in tensors]
    if not flat:
        return [0.0, 0.0]
    v = torch.cat(flat)
    return [float(v.sum()), float(v.pow(2).sum())]


@torch.no_grad()
def trace_record(trainee, x: torch.Tensor, y: torch.Tensor, feats: Mapping, metrics: Mapping[str, float],
                 epoch: int, batch: int, step: int) -> dict:
    obj, st = trainee.objective, trainee.step
    lams = {}
    if obj.meta is not None:
        prepared = obj.prepare(x, y, feats)
        lams = {p.name: float(lam.mean()) for p, lam in zip(trainee.pairs, prepared.lams)}
    return {"epoch": epoch, "batch": batch, "step": step, "metrics": dict(metrics), "lambda": lams,
            "theta": _sums(st.theta), "phi": _sums(st.phi), "momentum": _sums(st.bufs)}


def trace_log(run_dir: Path):
    from l2t_dist.train.metrics import JsonlLog

    return JsonlLog(Path(run_dir) / "trace.jsonl")
