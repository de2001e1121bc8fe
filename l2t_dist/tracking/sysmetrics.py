"""System metrics of the node that trains, in its MLflow run: MLflow's own SystemMetricsMonitor.

A daemon thread of the writing process (rank 0) samples CPU, memory, disk, network and, where
NVML finds them, the GPUs every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10)
and logs them as `system/...` metrics with steps 0, 1, 2, ... (docs/tracking.md lists them).
Subclassed for two things only: behind the Breaker it drops samples while the server does not
answer and goes on afterwards (MLflow's loop stops for good at the first failed call, and its
`finish()` would block on a dead server), and the samples since the last log are logged at
the end, so a run shorter than one interval still gets its point. Like MLflow's loop, it
stops by itself once the run is no longer RUNNING.
`MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false` turns it off.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

OFF = ("false", "0", "no", "off")
STOP_WAIT_S = 5.0
_noted = False


def start(uri: str, run_id: str, breaker, resume: bool = False, node_id: Optional[str] = None):
    """A started monitor of run `run_id` (stop it with `.stop()`), or None when turned off or
    psutil is missing (said once). `node_id`: MLflow logs the series as system/NODE_ID/..."""
    global _noted
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower() in OFF:
        return None
    try:
        import psutil  # noqa: F401 - MLflow's CPU monitor needs it
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as exc:
        if not _noted:
            print(f"note: system metrics are not recorded: {exc.name} is not installed (`pip install psutil`)",
                  file=sys.stderr, flush=True)
        _noted = True
        return None
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "GPU skipped" line on a CPU
    monitor = _monitor_class(SystemMetricsMonitor)(run_id, breaker, tracking_uri=uri, resume_logging=resume,
                                                   node_id=node_id)
    monitor.start()
    return monitor


class RankSystemMetrics:
    """A training-loop callback for the data-parallel ranks that do not write the run (rank >
    0): the system metrics of their node go into the same MLflow run, as system/rankN/...
    (rank 0's are system/...), so every node of a multi-node run is seen."""

    def __init__(self, uri: str, run_id: str, rank: int):
        self.uri, self.run_id, self.rank = uri, run_id, rank
        self.monitor = None

    def on_start(self, loop) -> None:
        from l2t_dist.tracking.breaker import Breaker, bound_http_calls

        bound_http_calls()
        try:
            self.monitor = start(self.uri, self.run_id, Breaker(self.uri, on_open=lambda reason: None),
                                 node_id=f"rank{self.rank}")
        except Exception as exc:  # noqa: BLE001 - the run goes on without them
            print(f"warning: system metrics of rank {self.rank} could not start ({exc}); training goes on",
                  file=sys.stderr, flush=True)

    def on_end(self, loop, summary) -> None:
        if self.monitor is not None:
            self.monitor.stop()


def _monitor_class(base):
    class Monitor(base):
        def __init__(self, run_id: str, breaker, **kwargs):
            super().__init__(run_id, **kwargs)
            self.breaker = breaker

        def monitor(self) -> None:
            samples = 0
            while True:
                self.collect_metrics()
                samples += 1
                stopping = self._shutdown_event.wait(self.sampling_interval)
                if stopping or samples >= self.samples_before_logging:
                    self._send()
                    samples = 0
                if stopping or self._shutdown_event.is_set():
                    return

        def _send(self) -> None:
            metrics = self.aggregate_metrics()
            if not metrics or not self.breaker.allows():
                for m in self.monitors:
                    m.clear_metrics()
                return
            try:
                self.publish_metrics(metrics)
                self.mlflow_logger.flush()
                if self.mlflow_logger.client.get_run(self._run_id).info.status != "RUNNING":
                    self._shutdown_event.set()  # ended elsewhere (a Ray driver): stop, as MLflow's loop does
            except Exception as exc:  # noqa: BLE001 - never ends the thread
                self.mlflow_logger.data = []
                self.breaker.failed(exc)

        def stop(self, timeout: float = STOP_WAIT_S) -> None:
            """Log the last samples and end the thread, waiting `timeout` s at most."""
            self._shutdown_event.set()
            if self._process is not None:
                self._process.join(timeout)

        @property
        def gpus(self) -> Optional[int]:
            return next((getattr(m, "num_gpus", None) for m in self.monitors if hasattr(m, "num_gpus")), None)

    return Monitor
