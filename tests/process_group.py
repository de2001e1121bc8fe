"""Run a command as a user would, in its own process group, so that a hang kills everything it
started (Ray's raylet, GCS and workers included) instead of leaving them to slow later tests."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest


def run_in_own_group(cmd: list[str], *, cwd, env: dict, timeout: float, merge_stderr: bool = False,
                     what: str = "") -> subprocess.CompletedProcess:
    """`subprocess.run` with a timeout that kills the whole group and fails the test with the tail
    of the output; stderr goes into stdout when `merge_stderr` (one interleaved log)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what or ' '.join(cmd)} ran past {timeout}s:\n{out[-3000:]}\n{(err or '')[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
