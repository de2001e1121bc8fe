"""`l2t-dist tune`: search spaces, trial resources, and real sweeps on a local 2-CPU Ray.

Fast (no Ray): every kind of invalid space file fails with a ConfigError that names the file
and the bad key, before Ray starts; the shipped spaces are valid; resource planning fails fast
when a trial cannot fit; the best trial is chosen by val, never by test.

Slow (a local Ray with 2 CPUs; each guarded against hangs):
- the acceptance sweep through the command in a subprocess: 4 trials, ASHA stops at least
  one, MLflow parent/child runs in a sqlite store, the best model registered as champion;
- --resume of an interrupted sweep continues the same parent run (and a failing trial ends
  FAILED);
- one trial on the Ray backend (a TorchTrainer inside the trial).

The tiny scratch job below learns deterministically (seed 0, one thread): with optim.lr=0.05
its val accuracy by epoch is 25, 31.25, 37.5, 50; with 1e-5 it is 25, 18.75, ... So a 1e-5
trial is always below the recorded ones at ASHA's rung 2 (grace 1, factor 2) and is stopped,
whatever the order in which two concurrent trials report.
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from process_group import run_in_own_group

from l2t_dist.cli import main
from l2t_dist.config import parse_job
from l2t_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SWEEP_TIMEOUT_S = 420


def tiny_job(out_dir, uri=None, **extra) -> dict:
    tree = {
        "data": {"kind": "synthetic", "path": "task=c,classes=4,per_class=40,size=16,seed=0", "image_size": 16,
                 "batch_size": 16, "eval_batch_size": 256},
        "target": {"arch": "resnet20"},
        "method": {"name": "scratch"},
        "optim": {"lr": 0.05, "epochs": 4},
        "run": {"name": "tiny", "out_dir": str(out_dir), "seed": 0, "threads": 1},
        "tracking": {"enabled": False} if uri is None else {"uri": uri, "experiment": "tune-test"},
    }
    for section, values in extra.items():
        tree.setdefault(section, {}).update(values)
    return tree


def write_yaml(path: Path, tree) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False) if not isinstance(tree, str) else tree)
    return path


# ---------------------------------------------------------------- fast: space files
GOOD = {"params": {"method.beta": {"loguniform": [0.05, 5]}, "method.T": {"choice": [1, 2, 3, 5]}}}

BAD_SPACES = {
    "bad_yaml": ("params: {method.beta: {loguniform: [0.05, 5]\n", ["not valid YAML"]),
    "not_a_job_key": ({"params": {"method.bta": {"uniform": [0, 1]}}},
                      ["params.method.bta", "not a job key", "unknown key 'method.bta'", "beta"]),
    "unknown_section": ({"params": {"methd.beta": {"uniform": [0, 1]}}},
                        ["params.methd.beta", "not a job key", "method"]),
    "unknown_distribution": ({"params": {"method.beta": {"gaussian": [0, 1]}}},
                             ["params.method.beta", "unknown distribution 'gaussian'", "loguniform", "choice",
                              "randint"]),
    "low_not_below_high": ({"params": {"method.beta": {"uniform": [2, 1]}}},
                           ["params.method.beta", "low must be below high", "low=2", "high=1"]),
    "loguniform_low_zero": ({"params": {"method.beta": {"loguniform": [0, 5]}}},
                            ["params.method.beta", "log scale needs low > 0"]),
    "randint_floats": ({"params": {"method.T": {"randint": [1.5, 4]}}}, ["params.method.T", "integers"]),
    "wrong_arity": ({"params": {"method.beta": {"uniform": [1]}}}, ["params.method.beta", "[low, high]"]),
    "bare_list": ({"params": {"method.T": [1, 2, 3]}}, ["params.method.T", "one-entry mapping", "choice"]),
    "value_rejected_by_schema": ({"params": {"method.where": {"choice": ["relu6", "sigmoid"]}}},
                                 ["params.method.where", "sigmoid", "relu6", "const"]),
    "bound_rejected_by_schema": ({"params": {"method.T": {"randint": [0, 4]}}},
                                 ["params.method.T", "greater than or equal to 1"]),
    "reserved_key": ({"params": {"optim.epochs": {"randint": [1, 5]}}}, ["optim.epochs", "scheduler.max_t"]),
    "unknown_top_key": ({**GOOD, "samples": 3}, ["unknown key 'samples'", "num_samples"]),
    "unknown_scheduler_key": ({**GOOD, "scheduler": {"grace": 1}}, ["scheduler.grace", "grace_period"]),
    "bad_reduction_factor": ({**GOOD, "scheduler": {"reduction_factor": 1}}, ["reduction_factor", "> 1"]),
    "unknown_search": ({**GOOD, "search": "bayes"}, ["search 'bayes'", "optuna", "random"]),
    "empty_params": ({"num_samples": 4}, ["non-empty 'params'"]),
    "point_outside_params": ({**GOOD, "points_to_evaluate": [{"optim.lr": 0.1}]},
                             ["points_to_evaluate[0]", "optim.lr"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_invalid_space_fails_before_ray_naming_file_and_key(case, tmp_path, capsys):
    content, expected = BAD_SPACES[case]
    job = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path / "runs"))
    space = write_yaml(tmp_path / f"{case}.yaml", content)
    started = time.perf_counter()
    assert main(["tune", str(job), "--space", str(space)]) == 2
    err = capsys.readouterr().err
    assert str(space) in err, err
    for text in expected:
        assert text in err, f"{text!r} missing from: {err}"
    assert time.perf_counter() - started < 10  # no Ray was started
    assert not (tmp_path / "runs").exists()


def test_missing_space_file_and_missing_flag(tmp_path, capsys):
    job = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path / "runs"))
    assert main(["tune", str(job), "--space", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["tune", str(job)]) == 2
    assert "--space" in capsys.readouterr().err


def test_grace_period_beyond_the_epochs_is_rejected(tmp_path, capsys):
    job = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path / "runs"))
    space = write_yaml(tmp_path / "s.yaml", {**GOOD, "scheduler": {"grace_period": 9}})
    assert main(["tune", str(job), "--space", str(space)]) == 2
    assert "grace_period=9" in capsys.readouterr().err


@pytest.mark.parametrize("space", ["default.yaml", "beta_T.yaml", "wide.yaml"])
@pytest.mark.parametrize("job", ["jobs/cifar10_limited.yaml", "jobs/multi_source.yaml"])
def test_shipped_spaces_are_valid(space, job):
    from l2t_dist.config import load_job
    from l2t_dist.tune.space import check_against_job, load_space

    s = load_space(REPO / "tune_spaces" / space)
    check_against_job(s, load_job(REPO / job))
    assert {"method.beta", "method.T"} <= set(s.params)
    assert s.params["method.beta"].dist == "loguniform" and s.params["method.beta"].args == [0.05, 5]
    assert s.params["method.T"].args == [1, 2, 3, 5]
    if space != "beta_T.yaml":  # the default space searches the meta learning rate (issue 17)
        assert s.params["meta.lr"].dist == "loguniform" and s.params["meta.lr"].args[0] <= 1e-4
    if space == "wide.yaml":
        assert {"meta.lr", "optim.lr", "method.where"} <= set(s.params)


def test_the_meta_lr_sweep_space_is_valid():
    from l2t_dist.config import load_job
    from l2t_dist.tune.space import check_against_job, load_space

    s = load_space(REPO / "tune_spaces" / "meta_lr_beta.yaml")
    check_against_job(s, load_job(REPO / "jobs/cifar10_limited.yaml"))
    assert set(s.params) == {"meta.lr", "method.beta"} and s.num_samples >= 8
    assert s.scheduler.name == "asha" and s.points_to_evaluate == [{"meta.lr": 1e-4, "method.beta": 0.5}]


def test_sampled_values_reach_the_trial_job(tmp_path):
    from l2t_dist.tune.trial import trial_job

    base = parse_job(tiny_job(tmp_path)).model_dump(mode="json")
    job = trial_job(base, {"method.beta": 0.7, "method.T": 3, "meta.lr": 1e-3}, str(tmp_path / "sw"), "abc_00001")
    assert (job.method.beta, job.method.T, job.meta.lr) == (0.7, 3, 1e-3)
    assert job.run.out_dir == str(tmp_path / "sw") and job.run.name == "abc_00001"
    assert job.tracking.enabled is False and job.run.eval_every == 1


# ---------------------------------------------------------------- fast: resources and selection
def test_local_trials_fit_the_cpus(tmp_path):
    from l2t_dist.tune.plan import plan_trials

    job = parse_job(tiny_job(tmp_path))
    two = {"CPU": 2.0}
    plan = plan_trials(job, "local", 4, two, [two])
    assert plan.concurrency == 2 and plan.trial_resources == {"cpu": 1.0} and plan.notes
    assert plan_trials(job, "local", None, two, [two]).concurrency == 2
    fat = parse_job(tiny_job(tmp_path, run={"threads": 3}))
    with pytest.raises(ConfigError, match="cannot place a trial.*run.threads=3"):
        plan_trials(fat, "local", None, two, [two])


def test_ray_trials_hold_a_hundredth_of_a_cpu_plus_their_workers(tmp_path):
    from l2t_dist.tune.plan import plan_trials

    job = parse_job(tiny_job(tmp_path, cluster={"workers": 2}))
    two = {"CPU": 2.0}
    plan = plan_trials(job, "ray", 2, two, [two])
    assert plan.trial_resources == {"cpu": 0.01}
    assert plan.per_trial["CPU"] * plan.concurrency <= 2.0 + 1e-9
    assert plan.job_overrides["cluster.cpus_per_worker"] == pytest.approx(0.49)
    explicit = parse_job(tiny_job(tmp_path, cluster={"workers": 2, "cpus_per_worker": 1}))
    with pytest.raises(ConfigError, match="cannot place the sweep.*max_concurrent_trials"):
        plan_trials(explicit, "ray", 2, two, [two])


def test_best_trial_is_chosen_by_val_never_by_test():
    from l2t_dist.tune.sweep import best_row
    from l2t_dist.tune.trial import best_of

    rows = [{"epoch": 1, "val_acc": 40.0, "test_acc": 90.0}, {"epoch": 2, "val_acc": 60.0, "test_acc": 10.0},
            {"epoch": 3, "val_acc": 60.0, "test_acc": 99.0}]
    b = best_of(rows, max_t=4)
    assert (b["best_val_acc"], b["test_acc_at_best_val"], b["best_epoch"], b["epochs"]) == (60.0, 10.0, 2, 3)
    assert b["stopped_early"]
    trials = [{"trial_id": "a", "best_val_acc": 50.0, "test_acc_at_best_val": 99.0},
              {"trial_id": "b", "best_val_acc": 70.0, "test_acc_at_best_val": 1.0},
              {"trial_id": "c", "best_val_acc": 70.0, "test_acc_at_best_val": 80.0},
              {"trial_id": "d", "best_val_acc": None, "test_acc_at_best_val": None}]
    assert best_row(trials)["trial_id"] == "b"


def test_search_is_optuna_when_importable_else_random(monkeypatch):
    from l2t_dist.tune.space import parse_space
    from l2t_dist.tune.sweep import search_name

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    assert search_name(parse_space({**GOOD, "search": "auto"}, "s.yaml")) == "random"
    assert search_name(parse_space({**GOOD, "search": "random"}, "s.yaml")) == "random"
    with pytest.raises(ConfigError, match="s.yaml.*optuna is not installed"):
        search_name(parse_space({**GOOD, "search": "optuna"}, "s.yaml"))
    monkeypatch.setitem(sys.modules, "optuna", type(sys)("optuna"))
    assert search_name(parse_space({**GOOD, "search": "auto"}, "s.yaml")) == "optuna-tpe"
    assert search_name(parse_space({**GOOD, "search": "random"}, "s.yaml")) == "random"


def test_resume_needs_a_sweep_folder(tmp_path, capsys):
    assert main(["tune", "--resume", str(tmp_path)]) == 2
    assert "sweep.json" in capsys.readouterr().err


def _state(tmp_path):
    from l2t_dist.tune.sweep import MlflowIds, SweepState

    base = parse_job(tiny_job(tmp_path)).model_dump(mode="json")
    return SweepState(name="tiny-s", backend="local", space_path="s.yaml", space=GOOD, base=base, max_t=4,
                      register="tiny-tune", mlflow=MlflowIds("sqlite:///m.db", "1", "abc"))


def test_sweep_state_round_trips(tmp_path):
    from l2t_dist.tune.sweep import SweepState

    state, path = _state(tmp_path), tmp_path / "sw" / "sweep.json"
    state.save(path)
    tree = json.loads(path.read_text())
    assert tree["version"] == 1 and tree["mlflow"]["parent_run_id"] == "abc"
    assert "finished" not in tree  # a running sweep's file is as it always was
    assert SweepState.load(path) == state
    state.finished, state.mlflow = True, None
    state.save(path)
    assert json.loads(path.read_text())["finished"] is True and SweepState.load(path) == state
    assert [p.name for p in path.parent.iterdir()] == ["sweep.json"]  # no temporary file left


@pytest.mark.parametrize("content, expected", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "a JSON list"),
    ('{"params": {}}', "no 'version' key"),
    ("other version", "of version 2, this l2t-dist reads version 1"),
    ("missing key", "missing key(s) ['base']"),
    ("bad mlflow", "'mlflow' must be null"),
])
def test_resume_rejects_what_is_not_a_sweep_state_naming_the_file(content, expected, tmp_path, capsys):
    from l2t_dist.tune.sweep import SweepState

    sweep_dir = tmp_path / "sw"
    (sweep_dir / "tune").mkdir(parents=True)
    path = sweep_dir / "sweep.json"
    _state(tmp_path).save(path)
    tree = json.loads(path.read_text())
    edits = {"other version": {"version": 2}, "bad mlflow": {"mlflow": {"uri": "x"}}}
    if content in edits:
        content = json.dumps({**tree, **edits[content]})
    elif content == "missing key":
        content = json.dumps({k: v for k, v in tree.items() if k != "base"})
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        SweepState.load(path)
    assert str(path) in str(err.value) and "not a sweep state" in str(err.value) and expected in str(err.value)
    assert main(["tune", "--resume", str(sweep_dir)]) == 2
    assert expected in capsys.readouterr().err


# ---------------------------------------------------------------- slow: real sweeps
@pytest.fixture
def hang_guard():
    """A hung sweep dumps every thread's stack and ends the test process instead of blocking CI."""
    faulthandler.dump_traceback_later(SWEEP_TIMEOUT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _short_tmp(prefix: str) -> str:
    # Ray's socket paths must stay under ~107 characters: pytest's tmp_path is too deep
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def _ray_processes(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri, parent_id=None):
    c = _client(uri)
    exp = c.get_experiment_by_name("tune-test")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    if parent_id is None:
        return runs
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


def _registry_val(client, mv) -> float:
    """The champion's val accuracy as the registry holds it (a version tag, else its run's metric)."""
    for key in ("val_acc", "best_val_acc"):
        if key in (mv.tags or {}):
            return float(mv.tags[key])
    run = client.get_run(mv.run_id)
    for key in ("registered_val_acc", "best_val_acc", "val_acc"):
        if key in run.data.metrics:
            return float(run.data.metrics[key])
    raise AssertionError(f"no val accuracy found for {mv}")


def _sweep_cli(tmp_path: Path, job: Path, space: Path, name: str, *more: str) -> dict:
    """`l2t-dist tune` as a user runs it, in its own process group and Ray temp dir; it must
    succeed and leave no Ray process behind. Returns its --json summary."""
    ray_tmp = _short_tmp("l2tt")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_TMPDIR"] = ray_tmp
    cmd = [sys.executable, "-m", "l2t_dist.cli", "tune", str(job), "--space", str(space), "--name", name,
           *more, "--json", "--quiet"]
    try:
        proc = run_in_own_group(cmd, cwd=tmp_path, env=env, timeout=SWEEP_TIMEOUT_S, merge_stderr=True,
                                what="the sweep")
    finally:
        time.sleep(1)
        leftovers = _ray_processes(ray_tmp)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert not leftovers, "the command left Ray processes behind"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_acceptance_sweep_asha_mlflow_and_registry(tmp_path):
    """4 trials on 2 CPUs, 2 at a time: the two slow learners are stopped by ASHA."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path / "runs", uri, cluster={"num_cpus": 2}))
    space = write_yaml(tmp_path / "space.yaml", {
        "params": {"optim.lr": {"loguniform": [1e-5, 0.1]}, "method.beta": {"loguniform": [0.05, 5]}},
        "num_samples": 4, "max_concurrent_trials": 2, "search": "random", "seed": 0,
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "points_to_evaluate": [{"optim.lr": 0.05, "method.beta": 0.1}, {"optim.lr": 0.1, "method.beta": 1.0},
                               {"optim.lr": 1e-5, "method.beta": 0.3}, {"optim.lr": 1e-5, "method.beta": 3.0}]})
    summary = _sweep_cli(tmp_path, job, space, "acc", "--register", "tiny-champ")

    # the table: 4 trials, at least one stopped early by ASHA, the best by val
    sweep_dir = tmp_path / "runs" / "acc"
    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert len(trials) == 4 and summary["failed"] == 0
    stopped = [t for t in trials.values() if t["status"] == "stopped early"]
    assert stopped and all(t["epochs"] < 4 for t in stopped)
    assert {t["params"]["optim.lr"] for t in stopped} == {1e-5} or len(stopped) > 2
    assert all(t["status"] == "completed" and t["epochs"] == 4 for t in trials.values() if t not in stopped)
    best = summary["best"]
    assert best["best_val_acc"] == max(t["best_val_acc"] for t in trials.values())
    # a learning trial wins (lr 1e-5 cannot learn in 4 epochs); which of the two is a matter of
    # a val image or two, so it is not pinned here
    assert best["params"]["optim.lr"] in (0.05, 0.1)
    assert best["best_val_acc"] > max(t["best_val_acc"] for t in trials.values() if t["params"]["optim.lr"] == 1e-5)
    assert Path(summary["png"]).is_file() and Path(summary["png"]).stat().st_size > 1000
    for tid in trials:
        assert (sweep_dir / tid / "best.pt").is_file() and (sweep_dir / tid / "metrics.jsonl").is_file()
    assert (sweep_dir / "tune").is_dir()

    # MLflow: one parent, four children ended with the status of what happened
    client = _client(uri)
    parent_id = summary["mlflow"]["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "acc"
    children = {r.data.tags["tune.trial_id"]: r for r in _runs(uri, parent_id)}
    assert set(children) == set(trials)
    for tid, run in children.items():
        expected = "KILLED" if trials[tid]["status"] == "stopped early" else "FINISHED"
        assert run.info.status == expected, (tid, run.info.status)
        assert float(run.data.params["optim.lr"]) == pytest.approx(trials[tid]["params"]["optim.lr"])
        assert run.data.params["data.batch_size"] == "16" and run.data.params["tracking.enabled"] == "False"
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert sorted(m.step for m in history) == list(range(1, trials[tid]["epochs"] + 1))
        assert max(m.value for m in history) == trials[tid]["best_val_acc"]
    assert len(_runs(uri)) == 5

    # the parent holds the best config and its metrics; test is only reported
    best_child = children[best["trial_id"]]
    logged_best = max(m.value for m in client.get_metric_history(best_child.info.run_id, "val_acc"))
    assert parent.data.metrics["best_val_acc"] == logged_best == best["best_val_acc"]
    assert parent.data.metrics["best_test_acc"] == best["test_acc_at_best_val"]
    assert float(parent.data.params["best.optim.lr"]) == best["params"]["optim.lr"]
    assert parent.data.tags["best.trial_id"] == best["trial_id"]

    # the registry: a version of the best trial's model, champion, with the best val accuracy
    reg = summary["registered"]
    assert reg["name"] == "tiny-champ" and reg["champion"]
    mv = client.get_model_version_by_alias("tiny-champ", "champion")
    assert str(mv.version) == str(reg["version"])
    assert mv.run_id == best_child.info.run_id
    assert _registry_val(client, mv) == logged_best


def test_optuna_search_samples_what_a_seeded_tpe_samples(tmp_path):
    """`search: optuna` really drives the trials through Optuna's TPE: the sweep's parameters
    are exactly what optuna's own TPESampler with the space's seed asks for first (its
    start-up trials), so the space's distributions and seed reach Optuna intact."""
    import optuna  # a test dependency (pyproject [test])
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    job = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path / "runs", cluster={"num_cpus": 2},
                                                      optim={"lr": 0.05, "epochs": 1}))
    space = write_yaml(tmp_path / "space.yaml", {
        "params": {"optim.lr": {"loguniform": [1e-4, 0.1]}, "optim.momentum": {"choice": [0.0, 0.9]}},
        "num_samples": 3, "max_concurrent_trials": 1, "search": "optuna", "seed": 0})
    summary = _sweep_cli(tmp_path, job, space, "opt")
    assert summary["search"] == "optuna-tpe" and summary["failed"] == 0 and len(summary["trials"]) == 3

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    expected = []
    for _ in range(3):
        trial = study.ask({"optim.lr": FloatDistribution(1e-4, 0.1, log=True),
                           "optim.momentum": CategoricalDistribution([0.0, 0.9])})
        expected.append((trial.params["optim.lr"], trial.params["optim.momentum"]))
        study.tell(trial, 0.0)
    got = [(t["params"]["optim.lr"], t["params"]["optim.momentum"]) for t in summary["trials"]]
    assert sorted(got) == sorted(expected)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    tmp = _short_tmp("l2tr")
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def _interrupt_when(predicate, timeout_s=SWEEP_TIMEOUT_S):
    """Send the sweep (this process) SIGUSR1, Tune's graceful stop, once predicate() holds."""
    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate() and signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None):
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_resume_continues_an_interrupted_sweep(tmp_path, local_ray, hang_guard):
    from l2t_dist.tune.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path / "runs", uri))
    space = write_yaml(tmp_path / "space.yaml", {
        "params": {"optim.lr": {"loguniform": [1e-5, 1e4]}}, "num_samples": 3, "max_concurrent_trials": 1,
        "search": "random", "scheduler": {"grace_period": 1, "reduction_factor": 2},
        # a good trial, one that diverges (non-finite loss), one that ASHA stops
        "points_to_evaluate": [{"optim.lr": 0.05}, {"optim.lr": 1e4}, {"optim.lr": 1e-5}]})
    sweep_dir = tmp_path / "runs" / "res"

    def first_trial_done():
        logs = list(sweep_dir.glob("*_00000/metrics.jsonl"))
        return bool(logs) and len(logs[0].read_text().splitlines()) == 4

    watcher = _interrupt_when(first_trial_done)
    first = run_sweep(str(job), [], str(space), name="res", quiet=True, register="tiny-res")
    watcher.join(timeout=1)
    assert first["interrupted"], first["trials"]
    assert first["registered"] is None
    parent_id = first["mlflow"]["parent_run_id"]
    assert _client(uri).get_run(parent_id).info.status == "RUNNING"

    final = run_sweep(resume=str(sweep_dir), quiet=True)
    assert not final["interrupted"]
    assert final["mlflow"]["parent_run_id"] == parent_id
    statuses = {t["params"]["optim.lr"]: t["status"] for t in final["trials"]}
    assert statuses == {0.05: "completed", 1e4: "failed", 1e-5: "stopped early"}
    failed = next(t for t in final["trials"] if t["status"] == "failed")
    assert "non-finite" in failed["error"]

    sweeps = [r for r in _runs(uri) if r.data.tags.get("l2t.kind") == "tune-sweep"]
    assert [r.info.run_id for r in sweeps] == [parent_id]  # continued, not duplicated
    assert sweeps[0].info.status == "FINISHED"
    children = _runs(uri, parent_id)
    assert len(children) == 3
    by_lr = {float(r.data.params["optim.lr"]): r for r in children}
    assert by_lr[0.05].info.status == "FINISHED" and by_lr[1e-5].info.status == "KILLED"
    assert by_lr[1e4].info.status == "FAILED" and "non-finite" in by_lr[1e4].data.tags["tune.error"]
    assert final["registered"]["version"] is not None
    assert main(["tune", "--resume", str(sweep_dir)]) == 2  # finished: nothing to resume


def test_ray_backend_trial_runs_a_torch_trainer(tmp_path, local_ray, hang_guard):
    from l2t_dist.tune.sweep import run_sweep

    job = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path / "runs", cluster={"workers": 1},
                                                     optim={"epochs": 2}))
    space = write_yaml(tmp_path / "space.yaml", {
        "params": {"optim.lr": {"loguniform": [1e-3, 0.1]}}, "num_samples": 1, "search": "random",
        "points_to_evaluate": [{"optim.lr": 0.05}]})
    summary = run_sweep(str(job), [], str(space), backend="ray", name="rb", quiet=True, no_register=True)
    (trial,) = summary["trials"]
    assert trial["status"] == "completed" and trial["epochs"] == 2, trial
    run_dir = tmp_path / "runs" / "rb" / trial["trial_id"]
    assert (run_dir / "best.pt").is_file() and (run_dir / "ray").is_dir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert trial["best_val_acc"] == max(r["val_acc"] for r in rows)
    saved = parse_job(yaml.safe_load((run_dir / "job.yaml").read_text()))
    assert saved.cluster.cpus_per_worker == 1.0 and saved.run.name == trial["trial_id"]
