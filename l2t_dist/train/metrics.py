"""Metrics out of the training loop: a JSON-lines log and a one-line progress bar."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO


class JsonlLog:
    """Append-only metrics log: one JSON object per line, flushed at once (nothing lost on a crash)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def truncate_after(self, epoch: int, step: int) -> None:
        """On resume, drop records written after the checkpoint, so nothing is duplicated."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= step and json.loads(line).get("epoch", 0) <= epoch]
        self.path.write_text("".join(line + "\n" for line in kept))


class Progress:
    """A single-line bar with loss, accuracy and images/s; silent when quiet or not a terminal."""

    def __init__(self, total: int, desc: str, quiet: bool = False, stream: Optional[TextIO] = None):
        self.total, self.desc, self.n = total, desc, 0
        self.stream = stream or sys.stderr
        self.enabled = not quiet
        self.start = time.perf_counter()
        self.images = 0

    def update(self, images: int, **fields: float) -> None:
        self.n += 1
        self.images += images
        tty = self.stream.isatty()
        if not self.enabled or not tty:
            return  # in logs (not a terminal) the trainer's one line per epoch is enough
        rate = self.images / max(1e-9, time.perf_counter() - self.start)
        width = 20
        done = int(width * self.n / max(1, self.total))
        info = " ".join(f"{k} {v:.4g}" for k, v in fields.items())
        end = "\n" if self.n >= self.total else ""
        self.stream.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
                          f"{info} {rate:.0f} img/s{end}")
        self.stream.flush()

    def images_per_s(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.start)


class ProgressLines:
    """For logs rather than terminals (a Ray worker's output is a log): one line every tenth
    of an epoch or every PROGRESS_EVERY_S seconds, with the epoch's running means so far."""

    EVERY_S = 30.0
    FRACTION = 0.1

    def __init__(self, n_batches: int, desc: str, quiet: bool = False, prefix: str = "[rank0] "):
        self.n, self.desc, self.quiet, self.prefix = n_batches, desc, quiet, prefix
        self.every = max(1, math.ceil(n_batches * self.FRACTION))
        self.start = self.last = time.perf_counter()
        self.images, self.loss, self.acc = 0, 0.0, 0.0

    def update(self, b: int, images: int, metrics: dict[str, float]) -> None:
        if self.quiet or sys.stderr.isatty():
            return
        self.images += images
        self.loss += metrics["loss"] * images
        self.acc += metrics["acc"] * images
        now = time.perf_counter()
        if b + 1 >= self.n or ((b + 1) % self.every and now - self.last < self.EVERY_S):
            return  # the last batch is summed up by the epoch line
        self.last = now
        n = max(1, self.images)
        print(f"{self.prefix}{self.desc} batch {b + 1}/{self.n} loss {self.loss / n:.4g} acc {100 * self.acc / n:.1f}% "
              f"{self.images / max(1e-9, now - self.start):.0f} img/s", file=sys.stderr, flush=True)
