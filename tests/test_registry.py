"""The registry contract and the tracked run's life cycle, on the embedded sqlite store (no server).

- register_checkpoint: the champion alias moves only when the val accuracy is strictly higher,
  the decision is kept as version tags, and the champion's val accuracy is the one logged for
  its run; a checkpoint of another signature is refused before anything is logged.
- `--resume` continues the same MLflow run (also when the stop fell between the checkpoint and
  the logging of an epoch); a Ctrl-C leaves the run KILLED, a NaN leaves it FAILED.
- URI resolution and probing, metric-name sanitising, model specs: plain unit tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from l2t_dist.config import parse_job
from l2t_dist.errors import ConfigError
from l2t_dist.tracking.models_cli import parse_spec
from l2t_dist.tracking.runs import metric_name
from l2t_dist.tracking.uri import check_tracking_uri, resolve_tracking_uri

# ---- unit tests (no mlflow needed) ---------------------------------------------------------------

def test_resolve_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri({"uri": "sqlite:///sub/x.db"}) == f"sqlite:///{tmp_path.resolve()}/sub/x.db"
    assert resolve_tracking_uri({"uri": "sqlite:////abs/x.db"}) == "sqlite:////abs/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(parse_job({"method": {"name": "scratch"}}).tracking) == "http://mlflow.example:5000"
    assert resolve_tracking_uri({"uri": "http://other:80"}) == "http://other:80"  # the job wins


def test_check_tracking_uri_names_the_problem(tmp_path):
    check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # a new database in an existing folder is fine
    with pytest.raises(ConfigError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path}/missing/mlflow.db")
    with pytest.raises(ConfigError, match="names no host"):
        check_tracking_uri("http://:5000")


def test_metric_names_follow_mlflow_rules():
    assert metric_name("s:layer1.2->layer3.0") == "s.layer1.2-to-layer3.0"
    assert metric_name("src a:block4->stage0") == "src a.block4-to-stage0"
    assert metric_name("x:t[0]->y") == "x.t_0_-to-y"


def test_model_specs():
    assert parse_spec("m@champion") == ("m", "champion", None)
    assert parse_spec("m/3") == ("m", None, "3")
    assert parse_spec("team/m") == ("team/m", None, None)
    with pytest.raises(ConfigError):
        parse_spec("m@")


def test_tracking_required_without_mlflow_is_a_clear_config_error(tmp_path):
    import subprocess
    import sys

    from test_imports import BLOCK  # makes `import mlflow` fail in the subprocess

    code = BLOCK + ("from l2t_dist.cli import main\n"
                    "sys.exit(main(['train', '--quiet', 'method.name=scratch', 'tracking.enabled=true',"
                    f" 'run.out_dir={tmp_path}']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "tracking.enabled=true but mlflow is not installed" in out.stderr
    assert not (tmp_path / "job").exists()  # failed before the run directory, data or model


# ---- real MLflow, embedded sqlite ----------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow():
    return pytest.importorskip("mlflow")


def tiny_job(out_dir, name="r", classes=4, **sections) -> dict:
    tree = {"data": {"path": f"task=c,classes={classes},per_class=8,size=16,seed=0", "image_size": 16,
                     "batch_size": 16},
            "target": {"arch": "resnet20"}, "method": {"name": "scratch"}, "optim": {"lr": 0.05, "epochs": 2},
            "run": {"name": name, "out_dir": str(out_dir), "seed": 0, "threads": 1}}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return tree


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def uri(store, mlflow):
    return f"sqlite:///{store}/mlflow.db"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def best_pts(tmp_path_factory):
    """best.pt of a 4-class and of a 3-class run (no tracking: only the checkpoints matter)."""
    from l2t_dist.train.local import train_local

    out = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for classes in (4, 3):
        job = parse_job(tiny_job(out, f"c{classes}", classes, optim={"epochs": 1}))
        train_local(job, quiet=True)
        paths[classes] = out / f"c{classes}" / "best.pt"
    return paths


def test_champion_moves_only_when_val_beats(uri, best_pts):
    from l2t_dist.tracking.registry import register_checkpoint
    from l2t_dist.tracking.runs import client, experiment_id

    c = client(uri)
    exp = experiment_id(uri, "champion-rule")

    def run_with(val):  # a run that logged its best val accuracy, as a training run does
        run_id = c.create_run(exp).info.run_id
        c.log_metric(run_id, "best_val_acc", val)
        return run_id

    first = register_checkpoint(run_with(50.0), best_pts[4], "rule", 50.0, tracking_uri=uri)
    assert first["version"] == 1 and first["champion"] and first["previous_champion"] is None
    assert first["model_uri"] == "models:/rule/1"

    tie = register_checkpoint(run_with(50.0), best_pts[4], "rule", 50.0, tracking_uri=uri)
    assert tie["version"] == 2 and not tie["champion"]  # strictly better only
    assert tie["previous_champion"]["version"] == 1 and tie["previous_champion"]["val_acc"] == 50.0

    better = register_checkpoint(run_with(62.5), best_pts[4], "rule", 62.5, tracking_uri=uri)
    assert better["version"] == 3 and better["champion"]

    champ = c.get_model_version_by_alias("rule", "champion")
    assert str(champ.version) == "3"
    assert float(champ.tags["val_acc"]) == c.get_run(champ.run_id).data.metrics["best_val_acc"] == 62.5
    assert champ.tags["previous_champion_version"] == "1" and champ.tags["previous_champion_val_acc"] == "50.0"
    assert "62.5000 > 50.0000" in champ.tags["champion_decision"]
    kept = c.get_model_version("rule", "2")
    assert kept.tags["champion_decision"].startswith("kept version 1") and kept.tags["val_acc"] == "50.0"

    # another number of classes under the same name: refused before a model is logged
    with pytest.raises(ConfigError) as err:
        register_checkpoint(run_with(99.0), best_pts[3], "rule", 99.0, tracking_uri=uri)
    assert "output float32 (-1, 4)" in str(err.value) and "output float32 (-1, 3)" in str(err.value)
    assert len(c.search_model_versions("name = 'rule'")) == 3


def _write_job(path: Path, tree: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.mark.parametrize("stop", ["after-epoch-1", "before-logging-epoch-1"])
def test_resume_continues_the_same_mlflow_run(stop, store, uri, mlflow, tmp_path, monkeypatch, capsys):
    """A Ctrl-C after epoch 1, then `--resume`: one MLflow run, metrics for both epochs.
    `before-logging`: the stop falls between last.pt and MLflow; the resume logs epoch 1 too."""
    from l2t_dist.cli import main
    from l2t_dist.tracking.callback import MlflowCallback
    from l2t_dist.train.loop import TrainingLoop

    monkeypatch.chdir(store)  # the embedded default: sqlite:///<cwd>/mlflow.db
    experiment = f"resume-{stop}"
    job = _write_job(tmp_path / "job.yaml", tiny_job(tmp_path / "runs", tracking={"experiment": experiment}))
    if stop == "after-epoch-1":
        original = TrainingLoop._train_epoch

        def interrupted(self, n):
            if self.epoch == 1:
                raise KeyboardInterrupt
            return original(self, n)
        monkeypatch.setattr(TrainingLoop, "_train_epoch", interrupted)
    else:
        def interrupted(self, run, record):
            raise KeyboardInterrupt
        monkeypatch.setattr(MlflowCallback, "on_epoch_end", interrupted)
    assert main(["train", job, "--quiet"]) == 130
    monkeypatch.undo()  # the patched loop goes; the environment of this test stays
    monkeypatch.chdir(store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")

    run_dir = tmp_path / "runs" / "r"
    first = json.loads((run_dir / "mlflow_run.json").read_text())
    assert first["tracking_uri"] == uri
    c = mlflow.tracking.MlflowClient(tracking_uri=uri)
    assert c.get_run(first["run_id"]).info.status == "KILLED"

    assert main(["train", "--resume", str(run_dir), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mlflow"]["run_id"] == first["run_id"] and summary["epochs"] == 2
    exp = c.get_experiment_by_name(experiment)
    found = c.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in found] == [first["run_id"]], "no duplicate run"
    assert found[0].info.status == "FINISHED"
    for key in ("train_loss", "val_acc"):
        assert [m.step for m in c.get_metric_history(first["run_id"], key)] == [1, 2], key
    assert found[0].data.tags.get("l2t.model_uri", "").startswith("models:/")


def test_a_failed_training_ends_the_mlflow_run_failed(uri, mlflow, tmp_path, capsys):
    from l2t_dist.cli import main

    job = _write_job(tmp_path / "job.yaml", tiny_job(tmp_path / "runs", "nan", optim={"lr": 1e12},
                                                      run={"checkpoint_every": 1},
                                                      tracking={"uri": uri, "experiment": "nan"}))
    assert main(["train", job, "--quiet"]) == 3
    assert "non-finite" in capsys.readouterr().err
    run_id = json.loads((tmp_path / "runs" / "nan" / "mlflow_run.json").read_text())["run_id"]
    assert mlflow.tracking.MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FAILED"


def test_tracking_disabled_writes_nothing(tmp_path, monkeypatch):
    from l2t_dist.cli import main

    monkeypatch.chdir(tmp_path)
    job = _write_job(tmp_path / "job.yaml", tiny_job(tmp_path / "runs", optim={"epochs": 1},
                                                      tracking={"enabled": False}))
    assert main(["train", job, "--quiet"]) == 0
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs" / "r" / "mlflow_run.json").exists()
