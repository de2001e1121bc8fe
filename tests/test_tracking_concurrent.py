"""Many runs, one tracking store (issue 16): runs started together must all start and finish,
and the `champion` alias must end on the best version whatever order they register in.

- Four real `l2t-dist train` processes started at once, registering one model, on a sqlite
  store that does not exist yet (MLflow's migrations raced: "Online migration expected to
  match one row", "duplicate column name") and on a real `mlflow server` (loopback, its own
  process group): all exit 0, four FINISHED runs with their system metrics, four versions,
  champion = the highest val accuracy (the earliest version on a tie).
- The compare-and-retry of `settle_champion` against the server, without any lock: eight
  threads register versions of known val accuracy at the same moment; and a stale move (the
  alias put back on a worse version) is undone by the next registration's re-read.
- An sqlite store of an older MLflow schema is upgraded under the lock, with a backup.
About 1-2 minutes on 2 cores.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from local_servers import free_port, http_json, mlflow_server_cmd, module_servers  # noqa: E402

BIN = Path(sys.executable).parent
RUNS = 4
BUDGET_S = 360
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_DISABLE_TELEMETRY": "true",
       "PYTHONUNBUFFERED": "1", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}


def train_cmd(out_dir: Path, uri: str, i: int, model: str) -> list[str]:
    """A tiny scratch run; seed and learning rate differ, so do the val accuracies (mostly)."""
    over = {"data.path": f"task=c,classes=4,per_class=8,size=16,seed={i}", "data.image_size": 16,
            "data.batch_size": 16, "target.arch": "resnet20", "method.name": "scratch", "optim.epochs": 2,
            "optim.lr": [0.05, 0.2, 0.01, 0.1][i % 4], "run.seed": i, "run.threads": 1, "run.name": f"r{i}",
            "run.out_dir": str(out_dir), "tracking.uri": uri, "tracking.experiment": "many",
            "tracking.registered_model": model, "tracking.heatmap_every": 0, "tracking.log_checkpoint": False}
    return [str(BIN / "l2t-dist"), "train", "--quiet", "--json", *(f"{k}={v}" for k, v in over.items())]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    yield from module_servers(tmp_path_factory, "concurrent", BUDGET_S)


@pytest.fixture(scope="module")
def server(servers):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    (servers.root / "mlflow-server").mkdir()
    servers.start("mlflow-server", mlflow_server_cmd(BIN, servers.root / "mlflow-server", port),
                  {**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    servers.wait_for("mlflow-server", lambda: http_json(uri + "/health")[0] == 200, servers.deadline, 120)
    return uri


def expected_champion(versions) -> str:
    best = max(versions, key=lambda v: (float(v.tags["val_acc"]), -int(v.version)))
    return str(best.version)


@pytest.mark.parametrize("store", ["sqlite-new", "server"])
def test_runs_started_together_all_finish_and_the_best_is_champion(store, servers, request):
    from mlflow.tracking import MlflowClient

    root = servers.root / store
    (root / "runs").mkdir(parents=True)
    uri = f"sqlite:///{root}/mlflow.db" if store == "sqlite-new" else request.getfixturevalue("server")
    model = f"many-{store}"
    for i in range(RUNS):
        servers.start(f"{store}-{i}", train_cmd(root / "runs", uri, i, model), ENV, cwd=root)
    for i in range(RUNS):
        code, out = servers.finish(f"{store}-{i}", servers.deadline, 300)
        assert code == 0 and "Traceback" not in out, out[-4000:]

    c = MlflowClient(tracking_uri=uri)
    found = c.search_runs([c.get_experiment_by_name("many").experiment_id])
    assert sorted(r.info.run_name for r in found) == [f"r{i}" for i in range(RUNS)]
    assert {r.info.status for r in found} == {"FINISHED"}
    for r in found:  # system metrics of the node that trained, through MLflow's own monitor
        assert r.data.metrics.get("system/cpu_utilization_percentage") is not None, r.data.metrics
        assert r.data.metrics["system/system_memory_usage_megabytes"] > 0
    versions = c.search_model_versions(f"name = '{model}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, RUNS + 1))
    by_run = {r.info.run_id: r for r in found}
    for v in versions:  # each version carries the val accuracy of its run's registered weights
        assert float(v.tags["val_acc"]) == by_run[v.run_id].data.metrics["best_val_acc"]
    assert str(c.get_model_version_by_alias(model, "champion").version) == expected_champion(versions)
    if store == "sqlite-new":
        assert (root / "mlflow.db.lock").exists()  # the migrations ran under it


def test_settle_champion_without_a_lock_ends_on_the_best(server, servers, best_pt):
    """Eight registrations at once against the server; then a stale move is undone."""
    from mlflow.tracking import MlflowClient

    from l2t_dist.tracking.registry import champion_version, log_target_model, settle_champion
    from l2t_dist.tracking.runs import client, experiment_id

    c = client(server)
    run_id = c.create_run(experiment_id(server, "settle")).info.run_id
    logged = log_target_model(run_id, best_pt, server)[0]
    c.create_registered_model("settle")
    vals = [61.0, 70.5, 55.0, 70.5, 12.0, 69.0, 70.0, 33.0]  # a tie for the best: the earlier version wins
    barrier, results, errors = threading.Barrier(len(vals)), [], []

    def register(val: float) -> None:
        try:
            mine = MlflowClient(tracking_uri=server)
            barrier.wait(timeout=60)
            mv = mine.create_model_version("settle", logged.model_uri, run_id, tags={"val_acc": repr(val)},
                                           model_id=logged.model_id)
            results.append(settle_champion(mine, "settle", int(mv.version), val))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(v,)) for v in vals]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == len(vals), errors
    versions = c.search_model_versions("name = 'settle'")
    best = expected_champion(versions)
    assert float(c.get_model_version("settle", best).tags["val_acc"]) == 70.5
    assert str(champion_version(c, "settle").version) == best
    winners = {r["version"]: r for r in results if r["champion"]}
    assert int(best) in winners  # the best saw itself win
    by_version = {int(v.version): float(v.tags["val_acc"]) for v in versions}
    for v, r in winners.items():  # another could only have won before the best existed for it
        assert by_version[v] <= by_version[int(best)], r
        assert r["decision"].startswith("champion"), r

    worst = min(versions, key=lambda v: float(v.tags["val_acc"]))
    c.set_registered_model_alias("settle", "champion", worst.version)  # a registration that read too early
    late = c.create_model_version("settle", logged.model_uri, run_id, tags={"val_acc": "1.0"},
                                  model_id=logged.model_id)
    result = settle_champion(c, "settle", int(late.version), 1.0)
    assert not result["champion"] and str(champion_version(c, "settle").version) == best
    assert c.get_model_version("settle", late.version).tags["champion_decision"].startswith(
        f"champion is version {best}")


@pytest.fixture(scope="module")
def best_pt(tmp_path_factory):
    from l2t_dist.config import parse_job
    from l2t_dist.train.local import train_local

    out = tmp_path_factory.mktemp("ckpt")
    job = parse_job({"data": {"path": "task=c,classes=4,per_class=8,size=16", "image_size": 16, "batch_size": 16},
                     "target": {"arch": "resnet20"}, "method": {"name": "scratch"}, "optim": {"epochs": 1},
                     "run": {"name": "c", "out_dir": str(out), "threads": 1}, "tracking": {"enabled": False}})
    train_local(job, quiet=True)
    return out / "c" / "best.pt"


def test_an_old_sqlite_schema_is_upgraded_under_the_lock_with_a_backup(tmp_path, capfd):
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config, _get_latest_schema_revision

    from l2t_dist.tracking import store
    from l2t_dist.tracking.runs import client

    uri = f"sqlite:///{tmp_path}/old.db"
    client(uri).search_experiments()  # a current database...
    command.downgrade(_get_alembic_config(uri), "-1")  # ...made one MLflow schema older
    old = store._revision(tmp_path / "old.db")
    assert old != _get_latest_schema_revision()
    store._READY.discard(uri)
    c = client(uri)
    assert store._revision(tmp_path / "old.db") == _get_latest_schema_revision()
    assert c.create_experiment("after-upgrade")
    assert store._revision(tmp_path / f"old.db.bak-{old}") == old
    assert "upgraded the MLflow database" in capfd.readouterr().err
