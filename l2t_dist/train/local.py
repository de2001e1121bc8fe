"""`l2t-dist train --backend local`: the training loop in this process, the world of one.

Runs with neither Ray nor MLflow installed (the GPU boxes have neither). Outputs go to
OUT_DIR/NAME (train/run_dir.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

from l2t_dist.config import JobConfig
from l2t_dist.train.loop import TrainingLoop
from l2t_dist.train.run_dir import RunDir
from l2t_dist.train.state import RunSummary


def train_local(job: Optional[JobConfig], resume: Optional[str] = None, quiet: bool = False,
                callbacks: Sequence = ()) -> RunSummary:
    """Train from a job, or resume the run in RUN_DIR from its last checkpoint."""
    run_dir = RunDir.open(job, resume)
    return TrainingLoop(run_dir.job, run_dir.path, quiet=quiet, callbacks=callbacks).run(run_dir.state)
