"""ASHA whose rungs survive `--resume`.

Tune saves the searcher's state with the experiment but not the scheduler's, so a restored
sweep would forget every result from before the interruption and, with too few new results,
stop nobody. Here each trial that had already run replays its epochs into the rungs when
Tune adds it back, from its run directory's metrics.jsonl (the trial's own record).
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler


class ResumableASHA(ASHAScheduler):
    def __init__(self, sweep_dir: str, **kwargs):
        super().__init__(**kwargs)
        self._sweep_dir = sweep_dir

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        log = Path(self._sweep_dir) / trial.trial_id / "metrics.jsonl"
        if not log.is_file():  # a new trial
            return
        bracket = self._trial_info[trial.trial_id]
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if row.get("val_acc") is not None:
                bracket.on_result(trial, row["epoch"], self._metric_op * row["val_acc"])
