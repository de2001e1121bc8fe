"""Bounded calls and a circuit breaker for an MLflow server that stops answering, so that
tracking never holds training hostage.

MLflow's client retries a failed HTTP call 7 times with exponential back-off and waits up to
120 s for each answer (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR, _TIMEOUT): against a
dead server one call blocks for minutes. `bound_http_calls` lowers those defaults (a variable
the user set wins). The Breaker then stops calling altogether once the server is found down:
callers ask `allows()` first, and every RETRY_S seconds one /health probe (2 s at most)
decides whether calls resume. An error is blamed on the server only when that probe fails too;
an error the server answered with is the caller's to report.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Optional

from l2t_dist.tracking.uri import server_down

HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}
RETRY_ENV = "L2T_MLFLOW_RETRY_S"  # seconds between probes of a server that does not answer
RETRY_S = 30.0


def bound_http_calls() -> None:
    """At most ~3 attempts of 15 s per MLflow HTTP call, unless the environment says otherwise."""
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


def retry_seconds() -> float:
    text = os.environ.get(RETRY_ENV, "").strip()
    try:
        return max(0.0, float(text)) if text else RETRY_S
    except ValueError:
        return RETRY_S


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Breaker:
    """Open while the server at `uri` does not answer; thread-safe (the epoch sender and the
    system-metrics monitor share one). `on_open(reason)` is called once per outage."""

    def __init__(self, uri: str, on_open: Optional[Callable[[str], None]] = None,
                 retry_s: Optional[float] = None):
        self.uri = uri
        self.retry_s = retry_seconds() if retry_s is None else retry_s
        self.on_open = on_open or (lambda reason: _stderr(f"warning: the MLflow server at {uri} does not answer "
                                                          f"({reason}); calls to it stop for a while"))
        self.reason: Optional[str] = None
        self.outages = 0
        self._lock = threading.Lock()
        self._open_until: Optional[float] = None  # time.monotonic() of the next probe while open
        self._probing = False
        self._recovered = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allows(self, probe_now: bool = False) -> bool:
        """True when calls may go out: closed, or open and a due probe (or `probe_now`) finds the
        server answering again, which closes it (see `pop_recovered`)."""
        with self._lock:
            if self._open_until is None:
                return True
            if self._probing or (not probe_now and time.monotonic() < self._open_until):
                return False
            self._probing = True
        reason = server_down(self.uri)
        with self._lock:
            self._probing = False
            if reason is None:
                self._open_until, self._recovered = None, True
                return True
            self._open_until = time.monotonic() + self.retry_s
            return False

    def failed(self, exc: BaseException) -> bool:
        """After a failed call: True (and open) when the server does not answer, False when the
        error is the server's own answer."""
        reason = server_down(self.uri)
        if reason is None:
            return False
        with self._lock:
            first = self._open_until is None
            self._open_until = time.monotonic() + self.retry_s
            self.reason = reason
            if first:
                self.outages += 1
        if first:
            self.on_open(reason)
        return True

    def pop_recovered(self) -> bool:
        """True once after the breaker closed again: what was dropped meanwhile must be sent."""
        with self._lock:
            recovered, self._recovered = self._recovered, False
            return recovered
