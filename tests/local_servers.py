"""Real servers on this machine for integration tests (`ray start` nodes, `mlflow server`,
`mlflow models serve`), each in its own process group, bounded by one deadline and always
stopped, so that a failing or hanging test can neither hang CI nor leave processes behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deadline:
    """One time budget for a whole module: every wait takes what is left of it."""

    def __init__(self, seconds: float, what: str):
        self.end, self.what = time.monotonic() + seconds, what

    def left(self, cap: Optional[float] = None) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            pytest.fail(f"{self.what}: ran past its time budget")
        return left if cap is None else min(left, cap)


class Servers:
    """Processes started with `start()`, each in a new session (its own process group), with
    stdout and stderr in LOG_DIR/NAME.log. `close()` stops their groups (SIGTERM, then SIGKILL)
    and every process whose command line names `marker` (a test's own temp folder), which
    catches what a server started in another session (a Ray job's driver)."""

    def __init__(self, log_dir: Path, marker: str):
        self.log_dir, self.marker = Path(log_dir), marker
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict, cwd=None) -> subprocess.Popen:
        with (self.log_dir / f"{name}.log").open("w") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd or self.log_dir, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def finish(self, name: str, deadline: Deadline, cap: float) -> tuple[int, str]:
        """Wait for a started command that should end by itself: (exit code, its output)."""
        proc = self.procs[name]
        try:
            proc.wait(timeout=deadline.left(cap))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} ran past {cap:.0f}s:\n{self.log(name)}")
        return proc.returncode, self.log(name, tail=200_000)

    def run(self, name: str, cmd: list[str], env: dict, deadline: Deadline, cap: float) -> tuple[int, str]:
        self.start(name, cmd, env)
        return self.finish(name, deadline, cap)

    def wait_for(self, name: str, check: Callable[[], bool], deadline: Deadline, cap: float) -> None:
        """Poll `check` until true; fail with the server's log when it exits or time runs out."""
        end = time.monotonic() + deadline.left(cap)
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                if check():
                    return
            proc = self.procs[name]
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            if time.monotonic() > end:
                pytest.fail(f"{name} was not ready within {cap:.0f}s:\n{self.log(name)}")
            time.sleep(0.5)

    def _ours(self) -> list:
        import psutil

        found = {}
        for proc in self.procs.values():
            with contextlib.suppress(psutil.Error):
                found.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error, TypeError):
                if p.pid != os.getpid() and any(self.marker in part for part in p.info["cmdline"] or ()):
                    found[p.pid] = p
        return list(found.values())

    def close(self, grace_s: float = 10.0) -> list[str]:
        """Stop everything; returns the command lines of processes that had to be SIGKILLed
        after the grace period (for the test's own check that nothing is left)."""
        import psutil

        strays = self._ours()  # before the groups go: children re-parented later are still known
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        end = time.monotonic() + grace_s
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, end - time.monotonic()))
        killed = []
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for p in {p.pid: p for p in strays + self._ours()}.values():
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    killed.append(" ".join(p.cmdline())[:200])
                    p.kill()
        return killed


def http_json(url: str, *, headers: Optional[dict] = None, body=None, timeout: float = 10.0) -> tuple[int, dict]:
    """(status, JSON body, or {"text": body}) of a GET, or of a POST when `body` is given; HTTP
    errors are returned, not raised, so that tests can assert on a 401."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={**(headers or {}),
                                                          **({"Content-Type": "application/json"} if data else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:  # /health answers "OK"
        return status, {"text": text}


def mlflow_server_cmd(exe_dir: Path, root: Path, port: int) -> list[str]:
    """A small real tracking server (sqlite store, proxied artifacts, one worker; see ENV.md);
    run it with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false in its environment."""
    return [str(exe_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--serve-artifacts", "--artifacts-destination", str(root / "art"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


def module_servers(tmp_path_factory, name: str, budget_s: float):
    """A module's Servers with its own temp root and time budget; a generator for a fixture
    that asserts at the end that no process was left behind."""
    root = tmp_path_factory.mktemp(name)
    servers = Servers(root, marker=str(root))
    servers.root, servers.deadline = root, Deadline(budget_s, f"tests ({name})")
    try:
        yield servers
    finally:
        assert servers.close() == [], "processes were left behind"
