"""Tracking never holds training hostage (issue 16): a real `mlflow server` that dies or hangs
in the middle of a real `l2t-dist train` run.

- Killed (SIGKILL of its process group) after a few epochs: the run goes on at the pace of an
  untracked run of the same job (measured here: the training phase, from the first epoch to
  the exit, within 1.5x; start-up is not the server's doing), warns once, and exits 0 saying
  the MLflow run is incomplete. After the server restarts on the same backend store,
  `l2t-dist models sync RUN_DIR` completes it: every epoch's metrics, the final ones, the
  artifacts, the model, registered as champion, and status FINISHED; a second sync sends
  nothing.
- Hung (SIGSTOP) and then resumed (SIGCONT) while the run trains: the breaker opens, the
  server answers again, and the run back-fills what it missed by itself (no sync needed).
About 1-2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from local_servers import Servers, free_port, http_json, mlflow_server_cmd, module_servers  # noqa: E402

BIN = Path(sys.executable).parent
EPOCHS = 30
HUNG_EPOCHS = 60  # the breaker must open (a 2 s timeout, a 2 s probe) well before the run ends
BUDGET_S = 400
MODEL = "outage"
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "L2T_MLFLOW"))},
       "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}


def train_cmd(out_dir: Path, name: str, uri, epochs: int = EPOCHS) -> list[str]:
    over = {"data.path": "task=c,classes=4,per_class=16,size=16,seed=0", "data.image_size": 16,
            "data.batch_size": 16, "target.arch": "resnet20", "method.name": "scratch", "optim.epochs": epochs,
            "run.threads": 1, "run.name": name, "run.out_dir": str(out_dir), "tracking.heatmap_every": 0}
    over.update({"tracking.uri": uri, "tracking.registered_model": MODEL, "tracking.experiment": "outage"}
                if uri else {"tracking.enabled": False})
    return [str(BIN / "l2t-dist"), "train", "--quiet", "--json", *(f"{k}={v}" for k, v in over.items())]


class Store:
    """One sqlite backend served by `mlflow server` on one port, which a test may kill and restart."""

    def __init__(self, servers: Servers, root: Path):
        self.servers, self.root, self.port, self.n = servers, root, free_port(), 0
        self.uri = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.n += 1
        self.name = f"mlflow-server-{self.n}"
        self.servers.start(self.name, mlflow_server_cmd(BIN, self.root, self.port),
                           {**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        self.servers.wait_for(self.name, lambda: http_json(self.uri + "/health", timeout=2)[0] == 200,
                              self.servers.deadline, 120)

    def signal(self, sig: int) -> None:
        os.killpg(self.servers.procs[self.name].pid, sig)
        if sig == signal.SIGKILL:
            self.servers.procs[self.name].wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    yield from module_servers(tmp_path_factory, "outage", BUDGET_S)


@pytest.fixture(scope="module")
def store(servers):
    """The module's server; the first test kills it and starts it again on the same store."""
    store = Store(servers, servers.root / "store")
    store.start()
    return store


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_until(check, servers: Servers, name: str, cap: float, what: str) -> float:
    """Poll `check` (every 50 ms) while `name` runs; the time it first held."""
    end = time.monotonic() + servers.deadline.left(cap)
    while not check():
        if servers.procs[name].poll() is not None:
            pytest.fail(f"{name} exited before {what}:\n{servers.log(name)}")
        if time.monotonic() > end:
            pytest.fail(f"{name}: no {what} within {cap:.0f}s:\n{servers.log(name)}")
        time.sleep(0.05)
    return time.monotonic()


def timed_run(servers: Servers, name: str, cmd: list[str], metrics: Path, during=None) -> tuple[float, float, str]:
    """(seconds from start to exit, seconds from the first epoch to exit, output) of one run;
    `during()` is called once the run trains."""
    t0 = time.monotonic()
    servers.start(name, cmd, ENV, cwd=servers.root)
    first = wait_until(lambda: lines(metrics) >= 1, servers, name, 240, "first epoch")
    if during is not None:
        during()
    code, out = servers.finish(name, servers.deadline, 240)
    end = time.monotonic()
    assert code == 0 and "Traceback" not in out, out[-4000:]
    return end - t0, end - first, out


def summary_of(out: str) -> dict:
    return json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))


def test_a_killed_server_costs_no_speed_and_sync_completes_the_run(servers, store):
    from mlflow.tracking import MlflowClient

    from l2t_dist.cli import main

    runs = servers.root / "runs"
    total_u, train_u, _ = timed_run(servers, "untracked", train_cmd(runs, "untracked", None),
                                    runs / "untracked" / "metrics.jsonl")

    run_dir = runs / "tracked"
    c = MlflowClient(tracking_uri=store.uri)

    def kill_after_a_few_epochs():
        wait_until(lambda: lines(run_dir / "metrics.jsonl") >= 4, servers, "tracked", 120, "4 epochs")
        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        wait_until(lambda: len(c.get_metric_history(run_id, "train_loss")) >= 3, servers, "tracked", 60,
                   "3 epochs in MLflow")
        store.signal(signal.SIGKILL)

    total_t, train_t, out = timed_run(servers, "tracked", train_cmd(runs, "tracked", store.uri),
                                      run_dir / "metrics.jsonl", during=kill_after_a_few_epochs)
    print(f"untracked {total_u:.1f}s (training {train_u:.1f}s); tracked, server killed {total_t:.1f}s "
          f"(training {train_t:.1f}s)")
    assert train_t <= 1.5 * train_u, (train_t, train_u)
    assert out.count(f"the MLflow server at {store.uri} does not answer") == 1, out[-3000:]
    assert "is incomplete (the server did not answer)" in out and f"l2t-dist models sync {run_dir}" in out
    summary = summary_of(out)
    assert summary["epochs"] == EPOCHS and summary["mlflow"]["pending"] is True
    assert (run_dir / "mlflow_pending.json").is_file()

    store.start()  # the same backend store, the same port
    run_id = summary["mlflow"]["run_id"]
    assert c.get_run(run_id).info.status == "RUNNING"
    code, sync_out = servers.run("sync", [str(BIN / "l2t-dist"), "models", "sync", str(run_dir), "--json"], ENV,
                                 servers.deadline, 240)
    assert code == 0, sync_out[-4000:]
    synced = summary_of(sync_out)
    assert synced["status"] == "FINISHED" and synced["epochs_sent"] >= EPOCHS - 5 - 1
    assert synced["registered"]["version"] == 1 and synced["registered"]["champion"]

    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "train_acc", "val_acc", "lr"):
        assert [m.step for m in c.get_metric_history(run_id, key)] == list(range(1, EPOCHS + 1)), key
    assert run.data.metrics["best_val_acc"] == pytest.approx(summary["best_val_acc"])
    assert {"summary.json", "learning_curves.png"} <= {a.path for a in c.list_artifacts(run_id)}
    assert run.data.tags["l2t.model_uri"] == f"models:/{MODEL}/1"
    champ = c.get_model_version_by_alias(MODEL, "champion")
    assert champ.run_id == run_id and float(champ.tags["val_acc"]) == summary["best_val_acc"]
    assert not (run_dir / "mlflow_pending.json").exists()

    assert main(["models", "sync", str(run_dir), "--json"]) == 0  # again: nothing left to send
    assert len(c.search_model_versions(f"name = '{MODEL}'")) == 1
    assert len(c.get_metric_history(run_id, "train_loss")) == EPOCHS


def test_a_hung_server_that_comes_back_gets_every_epoch_without_sync(servers, store):
    from mlflow.tracking import MlflowClient

    run_dir = servers.root / "runs" / "hung"
    env = {"L2T_MLFLOW_RETRY_S": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    ENV.update(env)  # the user's own settings win over the bounded defaults
    try:
        def hang_then_resume():
            wait_until(lambda: lines(run_dir / "metrics.jsonl") >= 3, servers, "hung", 120, "3 epochs")
            store.signal(signal.SIGSTOP)
            wait_until(lambda: "does not answer" in servers.log("hung"), servers, "hung", 60, "the breaker")
            store.signal(signal.SIGCONT)

        _, _, out = timed_run(servers, "hung", train_cmd(servers.root / "runs", "hung", store.uri, HUNG_EPOCHS),
                              run_dir / "metrics.jsonl", during=hang_then_resume)
    finally:
        for key in env:
            ENV.pop(key)
    assert out.count("does not answer") == 1 and f"the MLflow server at {store.uri} answers again" in out, out
    summary = summary_of(out)
    assert "pending" not in summary["mlflow"] and not (run_dir / "mlflow_pending.json").exists()
    c = MlflowClient(tracking_uri=store.uri)
    run_id = summary["mlflow"]["run_id"]
    assert c.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run_id, "train_loss")] == list(range(1, HUNG_EPOCHS + 1))
    assert c.get_run(run_id).data.tags["l2t.model_uri"].startswith(f"models:/{MODEL}/")


def test_breaker_opens_once_per_outage_and_probes_again_later():
    """Against a port where nothing listens (a dead server), and a store with no server."""
    from l2t_dist.tracking.breaker import Breaker

    said = []
    breaker = Breaker(f"http://127.0.0.1:{free_port()}", on_open=said.append, retry_s=0.3)
    assert breaker.allows() and not breaker.is_open
    assert breaker.failed(RuntimeError("connection refused")) and breaker.is_open
    assert breaker.failed(RuntimeError("again")) and len(said) == 1 and breaker.outages == 1
    assert not breaker.allows()                      # not due: no call, no probe
    time.sleep(0.35)
    assert not breaker.allows() and breaker.is_open  # due: probed, still down
    assert not breaker.pop_recovered()
    assert not Breaker("sqlite:///x.db", on_open=said.append).failed(RuntimeError("database is locked"))


def test_the_callback_pickles_as_plain_data_even_while_it_runs():
    import pickle

    from l2t_dist.tracking.breaker import Breaker
    from l2t_dist.tracking.callback import MlflowCallback, _Live

    cb = MlflowCallback("http://127.0.0.1:1", {"experiment": "x"}, Path("runs/x"), run_id="abc")
    cb._live = _Live(Breaker(cb.uri), sender=object(), monitor=None)  # a thread lock inside: not picklable
    back = pickle.loads(pickle.dumps(cb))
    assert back.run_id == "abc" and back._live is None and back.uri == cb.uri
