"""The multi-node recipe of the docs, run for real with Ray token authentication on.

Ray 2.60 turns token authentication on for `ray start --head` once a token exists (a local
`ray.init()` writes ~/.ray/auth_token), and then a node or client without the token is
refused. `ray.cluster_utils.Cluster` never meets this, so this module starts what a user
starts, as docs/distributed.md says, on this machine:
- a token from `ray get-auth-token --generate`; the head reads it from its ~/.ray/auth_token,
  the worker node from RAY_AUTH_TOKEN_PATH, the submitting client from RAY_AUTH_TOKEN, all
  with RAY_AUTH_MODE=token (each in its own empty HOME, so the developer's ~/.ray is not
  touched);
- `ray start --head` (1 CPU, resource src_node) and `ray start --address` (1 CPU, resource
  train_node) as separate process trees, and a real `mlflow server` (sqlite, loopback);
- `ray job submit --working-dir DIR -- l2t-dist train JOB --backend ray --json`: a two-source
  L2T-ww job (JOB in DIR, uploaded through the job API) whose source actors are pinned to the
  head and whose two train workers are pinned to the worker node, tracked to the server and
  registered as MODEL;
- then the champion is read through MLflow's REST API and served by
  `mlflow models serve -m models:/MODEL@champion`, whose predictions must be the logits of
  the run's best.pt.
Auth is shown to be on: a `ray start --address` without the token fails with Ray's
InvalidAuthToken (the users' symptom), and the job API answers 401 without a token, 403 with a
wrong one.

The HTTP servers (dashboard/job API, MLflow, the model server) listen on 127.0.0.1. Ray's
GCS and raylets listen on every interface whatever --node-ip-address says (Ray also replaces
127.0.0.1 by the machine's address), so here they are protected by the token, as on a real
cluster. Everything runs under one time budget (BUDGET_S) in process groups that are always
stopped (not with `ray stop`, which stops every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")
pytest.importorskip("psutil")

from local_servers import Deadline, Servers, free_port, http_json, mlflow_server_cmd  # noqa: E402

BIN = Path(sys.executable).parent
BUDGET_S = 420  # the whole module; it takes about 2-3 minutes on 2 cores
MODEL = "cluster-auth-target"
OBJECT_STORE = str(100 * 2**20)  # bytes per node; Ray's minimum is 75 MiB


def _env(home: Path, **extra) -> dict:
    """This environment without any Ray or MLflow client settings, with its own HOME."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and not k.startswith("MLFLOW_TRACKING_")}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # SIGTERM stops a node at once, no 30 s drain
    env.update(extra)
    return env


def _agent_ports() -> list[str]:
    """Ports that two nodes on one machine would otherwise share (52365 and friends)."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def _job(root: Path, ckpt_a: str, ckpt_b: str, tracking_uri: str) -> dict:
    return {
        "data": {"kind": "synthetic", "path": "task=c,classes=4,per_class=8,size=16,seed=0",
                 "image_size": 16, "batch_size": 16, "eval_batch_size": 64},
        "sources": [{"name": "a", "arch": "resnet20", "checkpoint": ckpt_a, "taps": [5, 8]},
                    {"name": "b", "arch": "vgg9_bn", "checkpoint": ckpt_b, "taps": [2]}],
        "target": {"arch": "resnet20"},
        "method": {"name": "l2t_ww", "T": 1, "beta": 0.1},
        "optim": {"lr": 0.05, "epochs": 1},
        "meta": {"lr": 1e-2},
        "run": {"name": "auth", "out_dir": str(root / "runs"), "seed": 3, "threads": 1, "max_iters_per_epoch": 2},
        "cluster": {"workers": 2, "cpus_per_worker": 0.4, "worker_resources": {"train_node": 1},
                    "cpus_per_source_actor": 0.2, "source_resources": {"src_node": 1}, "max_failures": 0,
                    "request_timeout_s": 120, "start_timeout_s": 60},
        "tracking": {"uri": tracking_uri, "experiment": "cluster-auth", "registered_model": MODEL,
                     "heatmap_every": 0, "log_checkpoint": False},
    }


def _last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise AssertionError(f"no JSON summary in the job's output:\n{text[-4000:]}")


@pytest.fixture(scope="module")
def cluster(source_ckpt):
    import torch
    import yaml

    from l2t_dist.models import build_model
    from l2t_dist.sources.zoo import save_model_checkpoint

    # A short root: Ray's socket paths under --temp-dir must stay below 108 characters.
    root = Path(tempfile.mkdtemp(prefix="l2t-auth-"))
    deadline = Deadline(BUDGET_S, "tests/test_cluster_auth.py")
    servers = Servers(root, marker=str(root))
    try:
        torch.manual_seed(2)
        save_model_checkpoint(str(root / "b.pt"), build_model("vgg9_bn", 3), "vgg9_bn")
        mlflow_port, gcs, dash = free_port(), free_port(), free_port()
        tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        (root / "submit").mkdir()  # the job's --working-dir: uploaded through the job API
        job_file = root / "submit" / "job.yaml"
        job_file.write_text(yaml.safe_dump(_job(root, source_ckpt, str(root / "b.pt"), tracking_uri)))
        plain = _env(root / "home-client")
        servers.start("mlflow-server", mlflow_server_cmd(BIN, root / "mlflow", mlflow_port),
                      {**plain, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

        # The token, as the docs make it: generated once, then handed to every node and client.
        head_home = root / "home-head"
        code, out = servers.run("get-auth-token", [str(BIN / "ray"), "get-auth-token", "--generate"],
                                _env(head_home), deadline, 60)
        assert code == 0, out
        token = (head_home / ".ray" / "auth_token").read_text().strip()
        assert len(token) >= 32 and token in out
        secret = root / "secrets" / "ray_token"
        secret.parent.mkdir(mode=0o700)
        shutil.copy(head_home / ".ray" / "auth_token", secret)
        secret.chmod(0o600)

        ray_tmp = root / "ray"
        servers.start("head", [
            str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
            "--num-cpus=1", '--resources={"src_node": 2}', f"--object-store-memory={OBJECT_STORE}",
            f"--temp-dir={ray_tmp}", "--disable-usage-stats", *_agent_ports()],
            _env(head_home, RAY_AUTH_MODE="token"))
        servers.wait_for("head", lambda: (ray_tmp / "ray_current_cluster").is_file(), deadline, 90)

        def join():
            return [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=1", f"--object-store-memory={OBJECT_STORE}", *_agent_ports()]

        servers.start("worker", [*join(), "--block", '--resources={"train_node": 2}', f"--temp-dir={ray_tmp}"],
                      _env(root / "home-worker", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(secret),
                           MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"))
        # The users' symptom: a node without the token (and without RAY_AUTH_MODE) is refused.
        # RAY_gcs_server_port_wait_time_s: give up after 2 connection attempts, not 20.
        servers.start("intruder", [*join(), f"--temp-dir={root / 'ray-intruder'}"],
                      _env(root / "home-intruder", RAY_gcs_server_port_wait_time_s="2"))

        auth = {"Authorization": f"Bearer {token}"}

        def nodes():
            status, body = http_json(f"http://127.0.0.1:{dash}/api/v0/nodes", headers=auth)
            alive = [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"] if status == 200 else []
            return {("head" if n["is_head_node"] else "worker"): n for n in alive} if len(alive) == 2 else None

        servers.wait_for("worker", lambda: nodes() is not None, deadline, 90)
        servers.wait_for("mlflow-server", lambda: http_json(tracking_uri + "/health")[0] == 200, deadline, 90)

        client = _env(root / "home-client", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        code, submit_out = servers.run("submit", [
            str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={job_file.parent}",
            "--", "l2t-dist", "train", job_file.name, "--backend", "ray", "--quiet", "--json"], client, deadline, 300)
        assert code == 0, submit_out[-6000:]
        intruder = servers.finish("intruder", deadline, 60)
        yield {"root": root, "servers": servers, "deadline": deadline, "dash": dash, "gcs": gcs, "token": token,
               "tracking_uri": tracking_uri, "nodes": nodes(), "intruder": intruder, "client_env": client,
               "summary": _last_json(submit_out), "submit_out": submit_out}
    finally:
        servers.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_node_without_the_token_is_refused(cluster):
    code, out = cluster["intruder"]
    assert code != 0, out
    assert "InvalidAuthToken" in out and "RAY_AUTH_MODE is currently 'disabled'" in out, out[-3000:]
    # the job API (dashboard, HTTP) wants the same token
    url = f"http://127.0.0.1:{cluster['dash']}/api/jobs/"
    assert http_json(url)[0] == 401  # no token
    assert http_json(url, headers={"Authorization": "Bearer " + "0" * len(cluster["token"])})[0] == 403  # a wrong one
    status, jobs = http_json(url, headers={"Authorization": f"Bearer {cluster['token']}"})
    assert status == 200 and [j["status"] for j in jobs] == ["SUCCEEDED"], jobs


def test_a_driver_without_the_token_gets_a_clear_error(cluster):
    """`l2t-dist train --address` with RAY_AUTH_MODE=token but no token: an `error:` line that
    says what to set, exit 2, no traceback."""
    root = cluster["root"]
    env = _env(root / "home-driver", RAY_AUTH_MODE="token")
    code, out = cluster["servers"].run("driver-no-token", [
        str(BIN / "l2t-dist"), "train", "method.name=scratch", "optim.epochs=1", f"run.out_dir={root / 'nt'}",
        "tracking.enabled=false", "--backend", "ray", "--address", f"127.0.0.1:{cluster['gcs']}"],
        env, cluster["deadline"], 120)
    assert code == 2, out[-3000:]
    assert "error: the Ray cluster at '127.0.0.1:" in out and "RAY_AUTH_TOKEN_PATH" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_submitted_job_places_sources_on_the_head_and_workers_on_the_worker(cluster):
    s, nodes = cluster["summary"], cluster["nodes"]
    assert "src_node" in nodes["head"]["resources_total"] and "train_node" in nodes["worker"]["resources_total"]
    assert s["backend"] == "ray" and s["workers"] == 2 and s["epochs"] == 1
    assert s["source_nodes"] == {"a": nodes["head"]["node_id"], "b": nodes["head"]["node_id"]}
    assert s["worker_nodes"] == [nodes["worker"]["node_id"]] * 2
    assert s["replica_max_diff"] == 0.0
    assert all(stats[0]["requests"] > 0 for stats in s["source_actors"].values())
    # tracked to the server (the job's driver runs on the head, rank 0 on the worker node)
    reg = s["mlflow"]["registered"]
    assert reg["name"] == MODEL and reg["version"] == 1 and reg["champion"], s["mlflow"]
    assert not (cluster["root"] / "mlflow.db").exists()


def test_the_champion_is_read_through_the_rest_api(cluster):
    uri, s = cluster["tracking_uri"], cluster["summary"]
    status, body = http_json(f"{uri}/api/2.0/mlflow/registered-models/alias?name={MODEL}&alias=champion")
    assert status == 200, body
    mv = body["model_version"]
    assert mv["name"] == MODEL and mv["version"] == "1" and mv["run_id"] == s["mlflow"]["run_id"]
    tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
    assert float(tags["val_acc"]) == s["best_val_acc"]
    assert tags["champion_decision"].startswith("champion: first version")
    status, run = http_json(f"{uri}/api/2.0/mlflow/runs/get?run_id={mv['run_id']}")
    assert status == 200 and run["run"]["info"]["status"] == "FINISHED"
    # system metrics, recorded by the process that writes the run: rank 0, on the worker node
    metrics = {m["key"] for m in run["run"]["data"]["metrics"]}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage"} <= metrics, sorted(metrics)
    assert "system/rank1/cpu_utilization_percentage" in metrics, sorted(metrics)  # and the other rank's
    run_tags = {t["key"]: t["value"] for t in run["run"]["data"]["tags"]}
    assert "l2t.system_metrics_node" in run_tags, sorted(run_tags)


def test_the_champion_is_served_and_predicts_the_best_checkpoint(cluster):
    import numpy as np
    import torch

    from l2t_dist.tracking.registry import load_checkpoint_model

    servers, deadline = cluster["servers"], cluster["deadline"]
    port = free_port()
    servers.start("model-server", [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                  {**cluster["client_env"], "MLFLOW_TRACKING_URI": cluster["tracking_uri"]})
    base = f"http://127.0.0.1:{port}"
    servers.wait_for("model-server", lambda: http_json(base + "/ping")[0] == 200, deadline, 120)

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))  # the signature's (-1, 3, 16, 16)
    status, body = http_json(base + "/invocations", body={"inputs": x.tolist()}, timeout=60)
    assert status == 200, body
    served = np.asarray(body["predictions"], dtype=np.float32)
    model, _ = load_checkpoint_model(Path(cluster["summary"]["run_dir"]) / "best.pt")
    with torch.no_grad():
        expected = model(x).numpy()
    assert served.shape == (2, 4)
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-4)


def test_everything_stops_and_nothing_is_left(cluster):
    servers = cluster["servers"]
    servers.close()
    assert servers._ours() == [], "processes of the test cluster survived its shutdown"
