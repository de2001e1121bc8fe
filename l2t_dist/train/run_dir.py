"""OUT_DIR/NAME, the run directory: created for a new run, reopened to resume one, guarded
against starting a second run on top of a first. Shared by the local backend, Ray and Tune.

It holds job.yaml, metrics.jsonl, last.pt (the resume state), best.pt (best by val) and,
when tracked, mlflow_run.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from l2t_dist.config import JobConfig, dump_job, parse_job
from l2t_dist.errors import ConfigError
from l2t_dist.train.state import TrainingState

LAST, BEST, METRICS, JOB = "last.pt", "best.pt", "metrics.jsonl", "job.yaml"
OUTPUT_FILES = (LAST, BEST, METRICS, JOB)


@dataclass
class RunDir:
    """A run directory with its job, and the state to resume from (None for a new run)."""

    path: Path
    job: JobConfig
    state: Optional[TrainingState] = None

    @classmethod
    def create(cls, job: JobConfig, absolute: bool = False) -> "RunDir":
        """A new run: refuse a directory that already holds one; write job.yaml.
        `absolute`: for runs whose workers may start in another working directory (Ray)."""
        path = Path(job.run.out_dir) / job.run.name
        path = path.resolve() if absolute else path
        if (path / LAST).exists():
            raise ConfigError(f"run directory {str(path)!r} already holds a run; continue it with "
                              f"`--resume {path}`, or pick another run.name (run.name=NEW)")
        path.mkdir(parents=True, exist_ok=True)
        (path / JOB).write_text(dump_job(job))
        return cls(path, job)

    @classmethod
    def resume(cls, path: str | Path, absolute: bool = False) -> "RunDir":
        """An existing run, with the job and the state of its last.pt."""
        path = Path(path).resolve() if absolute else Path(path)
        state = TrainingState.load(path / LAST)
        return cls(path, parse_job(state.job, where=f"checkpoint {path / LAST}"), state)

    @classmethod
    def open(cls, job: Optional[JobConfig], resume: Optional[str | Path], absolute: bool = False) -> "RunDir":
        if resume:
            return cls.resume(resume, absolute)
        if job is None:
            raise ConfigError("give a job file, or --resume RUN_DIR")
        return cls.create(job, absolute)

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST
