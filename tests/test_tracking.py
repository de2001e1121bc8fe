"""MLflow tracking of `l2t-dist train` against a REAL MLflow server on loopback (no mocks).

One module-scoped server (sqlite backend, proxied artifacts) and one tiny L2T-ww training run
through the command in a subprocess; the tests then read everything back with MlflowClient:
params, one metric value per epoch, the λ heat-map, the registered version and its alias,
the model loaded with plain `mlflow.pytorch.load_model` in a fresh process, and the
`l2t-dist models` commands. Bad inputs: an unreachable server fails in seconds with exit
code 2, and a registered-model name taken by another signature fails before training.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from l2t_dist.cli import main  # noqa: E402
from l2t_dist.tracking.runs import metric_name  # noqa: E402

MODEL = "tiny-accept"
EXPERIMENT = "accept"
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
ENV.pop("MLFLOW_TRACKING_URI", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:FREE_PORT in its own process group, stopped by group."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
    cmd += ["server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--serve-artifacts",
            "--artifacts-destination", str(root / "art"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def train_args(out_dir, source_ckpt, uri, classes=4, **extra) -> list[str]:
    over = {"data.path": f"task=c,classes={classes},per_class=8,size=16", "data.image_size": 16,
            "data.batch_size": 16, "target.arch": "resnet20", "method.name": "l2t_ww", "method.T": 1,
            "optim.epochs": 2, "optim.lr": 0.05, "meta.lr": 0.01, "run.threads": 1, "run.out_dir": str(out_dir),
            "tracking.uri": uri, "tracking.experiment": EXPERIMENT, **extra}
    sources = f"sources=[{{name: s, arch: resnet20, checkpoint: {source_ckpt}}}]"
    return ["train", "--quiet", "--json", sources, *(f"{k}={v}" for k, v in over.items())]


@pytest.fixture(scope="module")
def trained(server, source_ckpt, tmp_path_factory):
    """The acceptance run: `l2t-dist train` in a subprocess, registered under MODEL."""
    out = tmp_path_factory.mktemp("accept")
    cmd = [sys.executable, "-m", "l2t_dist.cli",
           *train_args(out / "runs", source_ckpt, server, **{"tracking.registered_model": MODEL})]
    proc = subprocess.run(cmd, cwd=out, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (out / "mlflow.db").exists() and not (out / "mlruns").exists()  # all went to the server
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server)


def test_train_run_is_tracked_params_metrics_artifacts(trained, client, tmp_path):
    from PIL import Image

    run_id = trained["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    params = run.data.params
    assert params["method.name"] == "l2t_ww" and params["optim.epochs"] == "2"
    assert params["data.image_size"] == "16" and params["sources.0.name"] == "s"
    assert params["tracking.registered_model"] == MODEL

    for key in ("train_loss", "train_acc", "val_acc", "test_acc", "images_per_s"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    assert trained["pairs"], "an l2t_ww run reports λ per pair"
    for pair in trained["pairs"]:
        for kind in ("lambda", "entropy"):
            history = client.get_metric_history(run_id, f"{kind}/{metric_name(pair)}")
            assert [m.step for m in history] == [1, 2], (kind, pair)
    assert run.data.metrics["best_val_acc"] == pytest.approx(trained["best_val_acc"])

    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"job.yaml", "lambda_heatmap.png", "learning_curves.png", "summary.json",
            "lambda_heatmaps", "checkpoints"} <= names, names
    assert {a.path for a in client.list_artifacts(run_id, "lambda_heatmaps")} == {
        "lambda_heatmaps/lambda_epoch_0001.png", "lambda_heatmaps/lambda_epoch_0002.png"}
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/last.pt"]
    png = client.download_artifacts(run_id, "lambda_heatmap.png", str(tmp_path))
    with Image.open(png) as im:
        im.verify()
        assert im.format == "PNG" and min(im.size) > 100


def test_the_model_is_registered_as_champion_with_its_val_acc(trained, client):
    reg = trained["mlflow"]["registered"]
    assert reg["name"] == MODEL and reg["version"] == 1 and reg["champion"] and reg["previous_champion"] is None
    champ = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champ.version) == "1" and champ.run_id == trained["mlflow"]["run_id"]
    # the champion's val accuracy is the best val accuracy logged for its run (best.pt's)
    logged = client.get_run(champ.run_id).data.metrics["best_val_acc"]
    assert float(champ.tags["val_acc"]) == logged == trained["best_val_acc"]
    assert champ.tags["champion_decision"].startswith("champion: first version")


def test_registered_model_loads_with_plain_mlflow_in_a_fresh_process(trained, server):
    code = ("import mlflow.pytorch, torch\n"
            f"m = mlflow.pytorch.load_model('models:/{MODEL}@champion')\n"
            "print(tuple(m(torch.randn(3, 3, 16, 16)).shape))\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**ENV, "MLFLOW_TRACKING_URI": server},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "(3, 4)"


def _cli_json(argv) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    lines = out.getvalue().strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 and lines else {})


def test_models_commands_list_show_load(trained, server, capsys):
    code, listed = _cli_json(["models", "list", "--tracking-uri", server, "--json"])
    assert code == 0
    entry = next(m for m in listed["models"] if m["name"] == MODEL)
    assert entry["champion_version"] == 1 and entry["champion_val_acc"] == trained["best_val_acc"]

    code, shown = _cli_json(["models", "show", MODEL, "--tracking-uri", server, "--json"])
    assert code == 0 and shown["aliases"] == {"champion": "1"}
    assert shown["latest_signature"] == "input float32 (-1, 3, 16, 16) -> output float32 (-1, 4)"
    assert shown["versions"][0]["val_acc"] == trained["best_val_acc"]

    code, loaded = _cli_json(["models", "load", f"{MODEL}@champion", "--predict-random", "5",
                              "--tracking-uri", server, "--json"])
    assert code == 0 and loaded["input_shape"] == [5, 3, 16, 16] and loaded["output_shape"] == [5, 4]

    capsys.readouterr()
    assert main(["models", "load", f"{MODEL}@nope", "--tracking-uri", server]) == 2
    assert "no alias 'nope'" in capsys.readouterr().err
    assert main(["models", "load", f"{MODEL}/9", "--tracking-uri", server]) == 2
    assert main(["models", "show", "no-such-model", "--tracking-uri", server]) == 2
    assert MODEL in capsys.readouterr().err  # the error lists what exists


def test_taken_name_with_another_signature_fails_before_training(trained, server, source_ckpt, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    args = train_args(tmp_path / "runs", source_ckpt, server, classes=3,
                      **{"tracking.registered_model": MODEL, "run.name": "clash"})
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"registered model {MODEL!r}" in err and "tracking.registered_model" in err
    assert "output float32 (-1, 4)" in err and "output float32 (-1, 3)" in err
    run_dir = tmp_path / "runs" / "clash"
    assert not (run_dir / "last.pt").exists(), "the check runs before the first training step"
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(tracking_uri=server).get_run(run_id).info.status == "FAILED"
    versions = MlflowClient(tracking_uri=server).search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"], "nothing was registered"


def test_unreachable_server_fails_fast_with_exit_code_2(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    cmd = [sys.executable, "-m", "l2t_dist.cli", "train", "--quiet", "method.name=scratch", "optim.epochs=1",
           f"run.out_dir={tmp_path / 'runs'}", f"tracking.uri={uri}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert f"cannot reach the MLflow tracking server at {uri!r}" in proc.stderr
    assert "tracking.enabled=false" in proc.stderr and "Traceback" not in proc.stderr
    assert elapsed < 15, elapsed
    assert not (tmp_path / "runs").exists(), "nothing was prepared: no data, no model, no run directory"
