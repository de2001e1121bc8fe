"""System metrics in the MLflow run, recorded by the process that writes it (issue 16).

With `--backend ray` that process is the Ray Train worker of rank 0, not the command:
tests/test_cluster_auth.py checks the `system/...` series of a job submitted to a real
two-node cluster (rank 0 on the worker node). Local runs are checked by
tests/test_tracking_concurrent.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("psutil")


BIN = Path(sys.executable).parent
NAMES = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
         "system/system_memory_usage_percentage", "system/disk_usage_percentage", "system/network_receive_megabytes"}


def test_system_metrics_can_be_turned_off(monkeypatch):
    from l2t_dist.tracking import sysmetrics

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert sysmetrics.start("sqlite:///unused.db", "no-run", breaker=None) is None
