"""One background thread that sends the per-epoch logging to MLflow, so that the training
thread never waits for the server (a slow answer, a timeout, a retry).

Tasks are callables `task(client)`. While the Breaker is open they are dropped: what they
carried is in RUN_DIR/metrics.jsonl, and `recover(client)` back-fills it from there once the
server answers again. A failure the server answered with goes to `on_error(what, exc)`.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from l2t_dist.tracking.breaker import Breaker

_STOP = object()


class Sender:
    def __init__(self, breaker: Breaker, make_client: Callable, recover: Callable,
                 on_error: Callable[[str, BaseException], None]):
        self.breaker, self._make_client, self._recover, self._on_error = breaker, make_client, recover, on_error
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="l2t-mlflow-sender", daemon=True)
        self._thread.start()

    def submit(self, task: Callable, what: str) -> None:
        self._queue.put((task, what))

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted task ran or was dropped; False when `timeout` s passed first."""
        q = self._queue
        deadline = time.monotonic() + timeout
        with q.all_tasks_done:
            while q.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                q.all_tasks_done.wait(left)
        return True

    def close(self, timeout: float) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        client = None
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                task, what = item
                if not self.breaker.allows():
                    self.dropped += 1
                    continue
                try:
                    client = client or self._make_client()
                    if self.breaker.pop_recovered():
                        self._recover(client)
                    task(client)
                except Exception as exc:  # noqa: BLE001 - nothing here may end the thread
                    if not self.breaker.failed(exc):
                        self._on_error(what, exc)
            finally:
                self._queue.task_done()
