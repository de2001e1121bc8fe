"""The README's first command, `l2t-dist demo`, end to end as a user runs it (no mocks).

One quick demo in a subprocess: local Ray, two pretrained sources served by actors, 2 Ray
Train workers, scratch against L2T-ww, both runs in a sqlite MLflow store. The tests read
back what a newcomer is promised: the printed table and λ, the runs and their artifacts in
MLflow (the λ heat-map and the learning curves), `demo-target@champion`, and the model
loading with plain `mlflow.pytorch.load_model` in a fresh process. Then the same demo is
pointed at files on disk with `--source` and `--data-root` (one process), and bad options fail
with exit code 2 and lose nothing.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from process_group import run_in_own_group

from l2t_dist.cli import main

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("ray")

ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}
for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
    ENV.pop(var, None)


def _l2t_dist(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """The command as a user runs it, in its own process group: on a timeout the whole group
    (Ray's processes included) is killed, so nothing is left running."""
    exe = Path(sys.executable).parent / "l2t-dist"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from l2t_dist.cli import main; "
                                                                 "sys.exit(main())"]
    return run_in_own_group(cmd + list(args), cwd=cwd, env=ENV, timeout=timeout, what=f"l2t-dist {' '.join(args)}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    proc = _l2t_dist("demo", "--quick", "--out", str(root / "out"), "--tracking-uri", uri, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"root": root, "uri": uri, "out": proc.stdout}


def test_demo_prints_the_table_the_lambdas_and_the_ui_command(demo):
    out = demo["out"]
    assert "2 Ray Train workers, sources served by Ray actors" in out
    assert "method    val acc" in out and "\nscratch " in out and "\nl2t_ww " in out
    assert "learned λ per pair" in out and "src_a:" in out and "src_b:" in out
    assert f"mlflow ui --backend-store-uri {demo['uri']}" in out
    for run in ("src_a", "src_b", "target-scratch", "target-l2t_ww"):
        assert (demo["root"] / "out" / run / "best.pt").exists()


def test_demo_runs_and_figures_are_in_mlflow(demo):
    client = mlflow.MlflowClient(demo["uri"])
    exp = client.get_experiment_by_name("l2t-dist-demo")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"target-scratch", "target-l2t_ww"}
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
        top = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"learning_curves.png", "job.yaml"} <= top, (name, top)
    ww = runs["target-l2t_ww"].info.run_id
    assert "lambda_heatmap.png" in {a.path for a in client.list_artifacts(ww)}
    png = Path(client.download_artifacts(ww, "lambda_heatmap.png", str(demo["root"])))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_champion_is_the_better_target_and_loads_in_a_fresh_process(demo):
    client = mlflow.MlflowClient(demo["uri"])
    champion = client.get_model_version_by_alias("demo-target", "champion")
    versions = client.search_model_versions("name='demo-target'")
    assert len(versions) == 2
    val = {v.version: client.get_run(v.run_id).data.metrics["best_val_acc"] for v in versions}
    assert val[champion.version] == max(val.values())
    code = ("import mlflow.pytorch, torch\n"
            "m = mlflow.pytorch.load_model('models:/demo-target@champion')\n"
            "print(tuple(m(torch.randn(3, 3, 16, 16)).shape))\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**ENV, "MLFLOW_TRACKING_URI": demo["uri"]},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "(3, 10)"


def _write_balanced_cifar10(root: Path, per_class: int) -> Path:
    """The official python-pickle layout with every class present (the readers' format)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 10 * per_class
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, f, protocol=2)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"labels": [i % 10 for i in range(n)], "data": data}, f, protocol=2)
    return root


def test_demo_on_given_checkpoints_and_data_pretrains_nothing(demo, tmp_path):
    data = _write_balanced_cifar10(tmp_path / "cifar", per_class=4)
    src = demo["root"] / "out" / "src_a" / "best.pt"
    proc = _l2t_dist("demo", "--quick", "--backend", "local", "--source", f"resnet20:{src}",
                     "--data-root", f"cifar10:{data}", "--per-class", "8", "--out", str(tmp_path / "out"),
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "pretraining" not in proc.stdout and "one process" in proc.stdout
    assert "src0:" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["target-l2t_ww", "target-scratch"]


@pytest.mark.parametrize("args, message", [
    (["--source", "resnet99:x.pt"], "must look like ARCH:CHECKPOINT"),
    (["--source", "resnet20:missing.pt"], "not found"),
    (["--data-root", "cifar10:no/such/folder"], "does not exist"),
    (["--data-root", "somewhere"], "must look like KIND:PATH"),
])
def test_bad_demo_options_fail_with_exit_2(tmp_path, capsys, args, message):
    assert main(["demo", "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_refuses_a_used_folder(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("precious")
    assert main(["demo", "--out", str(tmp_path / "used")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "used" / "keep.txt").read_text() == "precious"
