"""`l2t-dist tune JOB --space SPACE`: a Ray Tune sweep over a job, tracked in MLflow.

Order of work, cheapest checks first: the job and the space file (space.py), the search
algorithm, the MLflow URI; then Ray starts, the trial resources are planned against the
cluster (plan.py), and only then does Tune run. Layout of the sweep folder
OUT_DIR/<sweep name>/:
  sweep.json      everything --resume needs (base job, space, backend, MLflow ids)
  <trial id>/     each trial's run directory (job.yaml, metrics.jsonl, last.pt, best.pt)
  tune/           Ray Tune's experiment state and trial logs
  val_acc.png     best val accuracy per trial over (β, T) or the first two searched keys
  summary.json    the command's --json summary
Selection uses the val split only (ASHA and the best trial); test accuracy is only reported.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from l2t_dist.config import JobConfig, dump_job, load_job, parse_job
from l2t_dist.errors import ConfigError, L2TError
from l2t_dist.tune.space import SearchSpace, apply_params, check_against_job, load_space, parse_space

SWEEP_FILE = "sweep.json"
METRIC, MODE = "val_acc", "max"


# ---------------------------------------------------------------- the sweep state (sweep.json)
STATE_VERSION = 1


@dataclass
class MlflowIds:
    """Where the sweep's parent run is: --resume continues it instead of starting another."""
    uri: str
    experiment_id: str
    parent_run_id: str


@dataclass
class SweepState:
    """Everything --resume needs, as sweep.json holds it. Read and written only by load/save."""
    name: str
    backend: str
    space_path: str
    space: dict  # the space file, normalised (SearchSpace.to_dict)
    base: dict  # the job tree every trial starts from
    max_t: int
    register: Optional[str]
    mlflow: Optional[MlflowIds] = None
    finished: bool = False
    version: int = STATE_VERSION

    def to_json(self) -> dict:
        out = {"version": self.version, "name": self.name, "backend": self.backend, "space_path": self.space_path,
               "space": self.space, "base": self.base, "max_t": self.max_t, "register": self.register,
               "mlflow": asdict(self.mlflow) if self.mlflow else None}
        if self.finished:  # absent while running, as sweep.json has always been written
            out["finished"] = True
        return out

    def save(self, path: Path) -> None:
        """Atomic: an interrupted write never leaves a sweep that cannot be resumed."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> SweepState:
        def bad(what: str) -> ConfigError:
            return ConfigError(f"{str(path)!r} is not a sweep state of this l2t-dist: {what}")

        try:
            tree = json.loads(Path(path).read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"not valid JSON ({exc})") from None
        if not isinstance(tree, dict) or "version" not in tree:
            raise bad("no 'version' key; `l2t-dist tune` writes a JSON object with one" if isinstance(tree, dict)
                      else f"a JSON {type(tree).__name__}, not the object that `l2t-dist tune` writes")
        if tree["version"] != STATE_VERSION:
            raise bad(f"it is of version {tree['version']!r}, this l2t-dist reads version {STATE_VERSION}; "
                      "resume it with the l2t-dist that started it, or start the sweep again")
        known = {f.name for f in fields(cls)}
        missing = sorted(known - set(tree) - {"mlflow", "finished"})
        unknown = sorted(set(tree) - known)
        if missing or unknown:
            raise bad(f"missing key(s) {missing}" if missing else f"unknown key(s) {unknown}")
        ml = tree.get("mlflow")
        if ml is not None:
            if (not isinstance(ml, dict) or set(ml) != {f.name for f in fields(MlflowIds)}
                    or not all(isinstance(v, str) for v in ml.values())):
                raise bad(f"'mlflow' must be null or hold uri, experiment_id and parent_run_id, got {ml!r}")
            ml = MlflowIds(**ml)
        state = cls(**{**tree, "mlflow": ml})
        for key, ok in (("name", isinstance(state.name, str)), ("backend", isinstance(state.backend, str)),
                        ("space_path", isinstance(state.space_path, str)), ("space", isinstance(state.space, dict)),
                        ("base", isinstance(state.base, dict)),
                        ("max_t", isinstance(state.max_t, int) and not isinstance(state.max_t, bool)),
                        ("register", state.register is None or isinstance(state.register, str)),
                        ("finished", isinstance(state.finished, bool))):
            if not ok:
                raise bad(f"{key!r} has the wrong type ({type(getattr(state, key)).__name__})")
        return state


# ---------------------------------------------------------------- set-up (no Ray)
def _absolute(tree: dict) -> dict:
    """Trials run in Tune's trial folders, maybe on other nodes: no relative paths."""
    def fix(p: Optional[str]) -> Optional[str]:
        return p if not p or "://" in p else str(Path(p).expanduser().resolve())

    d = tree["data"]
    if d["kind"] != "synthetic":
        d["path"] = fix(d["path"])
    d["official_splits"] = fix(d.get("official_splits"))
    for s in tree["sources"]:
        s["checkpoint"] = fix(s["checkpoint"])
    tree["target"]["checkpoint"] = fix(tree["target"].get("checkpoint"))
    tree["cluster"]["storage_path"] = fix(tree["cluster"].get("storage_path"))
    return tree


def search_name(space: SearchSpace) -> str:
    """auto: Optuna's TPE when optuna is importable, else random search."""
    if space.search == "random":
        return "random"
    try:
        import optuna  # noqa: F401
    except ImportError:
        if space.search == "optuna":
            raise ConfigError(f"search space {space.path!r} asks for search: optuna, but optuna is not installed; "
                              "`pip install optuna`, or use search: random (or auto)") from None
        return "random"
    return "optuna-tpe"


def _tracking(job: JobConfig) -> Optional[str]:
    """The MLflow URI, or None when the job turns tracking off (or mlflow is missing and not required)."""
    from l2t_dist.tracking.uri import check_tracking_uri, mlflow_available, resolve_tracking_uri

    if job.tracking.enabled is False:
        return None
    if not mlflow_available():
        if job.tracking.enabled:
            raise ConfigError("tracking.enabled=true but mlflow is not installed; `pip install mlflow==3.17.2` "
                              "or set tracking.enabled=false")
        return None
    uri = resolve_tracking_uri(job.tracking)
    check_tracking_uri(uri)
    return uri


def _max_t(space: SearchSpace, job: JobConfig) -> int:
    return space.scheduler.max_t or job.optim.epochs


def _sized_space(space_path: str, job: JobConfig, num_samples: Optional[int],
                 max_concurrent: Optional[int]) -> SearchSpace:
    """The space file checked against the job, with the command line's sample and concurrency limits."""
    space = load_space(space_path)
    check_against_job(space, job)
    if num_samples is not None:
        space.num_samples = num_samples
    if max_concurrent is not None:
        space.max_concurrent_trials = max_concurrent
    max_t = _max_t(space, job)
    if space.scheduler.name == "asha" and space.scheduler.grace_period > max_t:
        raise ConfigError(f"search space {space.path!r}: scheduler.grace_period={space.scheduler.grace_period} "
                          f"exceeds the epochs of a trial ({max_t}); lower it or raise optim.epochs / scheduler.max_t")
    return space


def _new_dir(job: JobConfig, sweep_name: str) -> Path:
    sweep_dir = (Path(job.run.out_dir) / sweep_name).resolve()
    if (sweep_dir / SWEEP_FILE).exists():
        raise ConfigError(f"sweep folder {str(sweep_dir)!r} already holds a sweep; continue it with "
                          f"`l2t-dist tune --resume {sweep_dir}`, or pick another --name")
    return sweep_dir


def _base(job: JobConfig, max_t: int) -> dict:
    """The job every trial starts from: absolute paths, and the epochs of a trial."""
    base = _absolute(job.model_dump(mode="json"))
    base["optim"]["epochs"] = max_t
    return base


def _resumed(resume: str) -> tuple[SweepState, Path]:
    sweep_dir = Path(resume).resolve()
    f = sweep_dir / SWEEP_FILE
    if not f.is_file():
        raise ConfigError(f"--resume {resume!r}: no {SWEEP_FILE} there; give the folder of a sweep, "
                          "OUT_DIR/<sweep name>, as printed when it started")
    if not (sweep_dir / "tune").is_dir():
        raise ConfigError(f"--resume {resume!r}: the sweep never reached Ray Tune (no tune/ folder); "
                          f"remove {str(sweep_dir)!r} and start it again")
    state = SweepState.load(f)
    if state.finished:
        raise ConfigError(f"--resume {resume!r}: this sweep has finished; its summary is in "
                          f"{str(sweep_dir / 'summary.json')!r}. Start a new one with another --name")
    return state, sweep_dir


# ---------------------------------------------------------------- the sweep being run
@dataclass
class Sweep:
    """One run of the command (new or resumed), passed whole instead of in long parameter lists."""
    state: SweepState
    dir: Path
    space: SearchSpace
    job: JobConfig
    search: str
    uri: Optional[str]  # None: no MLflow
    quiet: bool

    @property
    def keys(self) -> list[str]:
        return list(self.space.params)

    @property
    def max_t(self) -> int:
        return self.state.max_t

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def save(self) -> None:
        self.state.save(self.dir / SWEEP_FILE)

    def callback(self):
        """The driver-side MLflow callback of this sweep's parent run (also finds child runs)."""
        from l2t_dist.tune.mlflow_runs import MlflowSweepCallback

        ml = self.state.mlflow
        return MlflowSweepCallback(ml.uri, ml.experiment_id, ml.parent_run_id, self.state.base, self.keys,
                                   str(self.dir), self.max_t)


# ---------------------------------------------------------------- Tune objects
def _searcher(space: SearchSpace, name: str, concurrency: int):
    """(search_alg, TuneConfig.max_concurrent_trials): Tune limits a Searcher (Optuna) itself but
    ignores the limit for a SearchGenerator (random search), which takes it directly."""
    if name == "optuna-tpe":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(points_to_evaluate=space.points_to_evaluate or None, seed=space.seed), concurrency
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=space.points_to_evaluate or None, random_state=space.seed,
                                 max_concurrent=concurrency), None


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import FIFOScheduler

    s = sweep.space.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    from l2t_dist.tune.asha import ResumableASHA

    # time_attr "epoch": our own counter, which a resumed trial continues (training_iteration restarts)
    return ResumableASHA(str(sweep.dir), time_attr="epoch", max_t=sweep.max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def _trial_dirname(trial) -> str:
    # pickled by name with the Tuner (tune/tuner.pkl): keep it here for --resume
    return trial.trial_id


def _trainable(sweep: Sweep, plan):
    from ray import tune

    from l2t_dist.tune.trial import run_trial

    spec = {"base": sweep.state.base, "keys": list(sweep.state.space["params"]), "sweep_dir": str(sweep.dir),
            "backend": sweep.state.backend}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), plan.trial_resources)


def _tuner(sweep: Sweep, plan, callbacks: list, resuming: bool):
    from ray import tune

    trainable = _trainable(sweep, plan)
    tune_dir = sweep.dir / "tune"
    if resuming:
        sweep.say(f"[tune] resuming {tune_dir}")
        return tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, restart_errored=True)
    space = sweep.space
    search_alg, limit = _searcher(space, sweep.search, plan.concurrency)
    return tune.Tuner(
        trainable, param_space={k: p.domain() for k, p in space.params.items()},
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=search_alg, scheduler=_scheduler(sweep),
                                    num_samples=space.num_samples, max_concurrent_trials=limit,
                                    trial_dirname_creator=_trial_dirname,
                                    # a local trial's process is reused by the next one
                                    # (no new Python and torch import per trial)
                                    reuse_actors=sweep.state.backend == "local"),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep.dir), callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  verbose=0 if sweep.quiet else 1))


# ---------------------------------------------------------------- results
def collect(results, keys: list[str], max_t: int) -> list[dict]:
    """One row per trial (Tune's view: what ASHA saw and MLflow logged)."""
    from l2t_dist.tune.trial import best_of, error_line

    # Result.config is empty for a trial that never reported: take the Trial's own
    trials = {t.trial_id: t for t in getattr(getattr(results, "_experiment_analysis", None), "trials", [])}
    rows = []
    for r in results:
        tid = r.metrics.get("trial_id")
        trial = trials.get(tid)
        config = trial.config if trial is not None else (r.config or {})
        df = r.metrics_dataframe
        reported = df.to_dict("records") if df is not None and "epoch" in df.columns else []
        row = {"trial_id": tid, "params": {k: _plain(config.get(k)) for k in keys}, **best_of(reported, max_t)}
        stopped = row.pop("stopped_early")
        if r.error is not None:
            row["status"], row["error"] = "failed", error_line(r.error)
        elif trial is not None and trial.status != "TERMINATED":
            row["status"] = "unfinished"
        else:
            row["status"] = "stopped early" if stopped else "completed"
        rows.append(row)
    rows.sort(key=lambda x: (x["best_val_acc"] is None, -(x["best_val_acc"] or 0.0), x["trial_id"]))
    return rows


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def best_row(rows: list[dict]) -> Optional[dict]:
    """Highest best-by-val accuracy; ties go to the earlier trial. Never looks at test."""
    scored = [r for r in rows if r["best_val_acc"] is not None]
    return min(scored, key=lambda r: (-r["best_val_acc"], r["trial_id"])) if scored else None


# ---------------------------------------------------------------- the command
def run_sweep(job_path: Optional[str] = None, overrides: list[str] = (), space_path: Optional[str] = None, *,
              backend: str = "local", name: Optional[str] = None, address: Optional[str] = None,
              num_samples: Optional[int] = None, max_concurrent: Optional[int] = None,
              register: Optional[str] = None, no_register: bool = False, resume: Optional[str] = None,
              quiet: bool = False) -> dict:
    if resume:
        state, sweep_dir = _resumed(resume)
    else:
        if space_path is None:
            raise ConfigError("--space SPACE.yaml is required (ready-made spaces are in tune_spaces/)")
        job = load_job(job_path, overrides)
        space = _sized_space(space_path, job, num_samples, max_concurrent)
        sweep_name = name or f"{job.run.name}-{Path(space_path).stem}"
        sweep_dir = _new_dir(job, sweep_name)
        max_t = _max_t(space, job)
        state = SweepState(name=sweep_name, backend=backend, space_path=str(space_path), space=space.to_dict(),
                           base=_base(job, max_t), max_t=max_t,
                           register=register if register is not None else (job.tracking.registered_model or
                                                                           f"{job.run.name}-tune"))
    if no_register:
        state.register = None
    space = parse_space(state.space, state.space_path)
    job = parse_job(state.base, where=f"sweep {str(sweep_dir)!r}")
    search = search_name(space)
    if state.mlflow:  # resuming: the store the sweep started in, wherever this runs from
        from l2t_dist.tracking.uri import check_tracking_uri

        uri = state.mlflow.uri
        check_tracking_uri(uri)
    else:
        uri = _tracking(job)
    sweep = Sweep(state, sweep_dir, space, job, search, uri, quiet)

    from l2t_dist.distributed.launcher import connect  # imports Ray from here on

    if address:
        job.cluster.address = address
    started_ray = connect(job.cluster, quiet=quiet)
    try:
        return _run(sweep, resume is not None)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _run(sweep: Sweep, resuming: bool) -> dict:
    from l2t_dist.distributed.launcher import cluster_snapshot
    from l2t_dist.tune.plan import plan_trials

    state, space, say = sweep.state, sweep.space, sweep.say
    _, total, nodes = cluster_snapshot()
    plan = plan_trials(sweep.job, state.backend, space.max_concurrent_trials, total, nodes)
    if plan.job_overrides:
        state.base = apply_params(state.base, plan.job_overrides)
    say(f"[tune] sweep {state.name} in {sweep.dir}: {space.num_samples} trials of {sweep.max_t} epochs, search "
        f"{sweep.search}, scheduler {space.scheduler.name}, backend {state.backend}")
    say(f"[tune] resources: {plan.describe()}; cluster: {total}")
    for note in plan.notes:
        say(f"[tune] note: {note}")

    callbacks = [_mlflow(sweep, plan)] if sweep.uri is not None else []
    sweep.save()
    (sweep.dir / "job.yaml").write_text(dump_job(parse_job(state.base, where="sweep base job")))
    tuner = _tuner(sweep, plan, callbacks, resuming)
    try:
        results = tuner.fit()
    except Exception:
        # Tune itself broke (a Ctrl-C is handled by Tune: fit returns and the sweep is resumable)
        if sweep.uri is not None and state.mlflow:
            from l2t_dist.tracking.runs import client

            client(sweep.uri).set_terminated(state.mlflow.parent_run_id, status="FAILED")
        raise
    return _finish(sweep, collect(results, sweep.keys, sweep.max_t))


def _mlflow(sweep: Sweep, plan):
    from l2t_dist.tracking.runs import experiment_id
    from l2t_dist.tune import mlflow_runs

    state, space, uri = sweep.state, sweep.space, sweep.uri
    if state.mlflow and state.mlflow.uri == uri:
        mlflow_runs.reopen(uri, state.mlflow.parent_run_id)
    else:
        exp_id = experiment_id(uri, sweep.job.tracking.experiment)
        params = {f"space.{k}": p.describe() for k, p in space.params.items()}
        params.update({"tune.num_samples": space.num_samples, "tune.max_concurrent_trials": plan.concurrency,
                       "tune.search": sweep.search, "tune.scheduler": json.dumps(vars(space.scheduler)),
                       "tune.max_t": sweep.max_t, "tune.backend": state.backend, "tune.seed": space.seed})
        parent = mlflow_runs.start_parent(uri, exp_id, state.name, tags={
            "l2t.kind": "tune-sweep", "l2t.sweep_dir": str(sweep.dir), "tune.space_file": state.space_path},
            params=params)
        state.mlflow = MlflowIds(uri=uri, experiment_id=exp_id, parent_run_id=parent)
        sweep.save()  # before any trial: a resumed sweep continues this run
    return sweep.callback()


def _finish(sweep: Sweep, rows: list[dict]) -> dict:
    from l2t_dist.tune.report import format_table, plot_val_acc

    state, space, say = sweep.state, sweep.space, sweep.say
    best = best_row(rows)
    png = plot_val_acc(rows, space, sweep.dir / "val_acc.png", f"{state.name}: best val accuracy per trial")
    interrupted = any(r["status"] == "unfinished" for r in rows) or len(rows) < space.num_samples
    summary: dict[str, Any] = {
        "sweep": state.name, "sweep_dir": str(sweep.dir), "backend": state.backend, "search": sweep.search,
        "scheduler": space.scheduler.name, "epochs": state.max_t, "trials": rows,
        "completed": sum(r["status"] == "completed" for r in rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows), "interrupted": interrupted,
        "png": str(png) if png else None, "best": None, "mlflow": None, "registered": None}
    if best is not None:
        run_dir = sweep.dir / best["trial_id"]
        summary["best"] = {k: best[k] for k in ("trial_id", "params", "best_val_acc", "test_acc_at_best_val",
                                                 "best_epoch", "epochs", "status")}
        summary["best"]["run_dir"] = str(run_dir)
        summary["best"]["checkpoint"] = str(run_dir / "best.pt") if (run_dir / "best.pt").exists() else None
    if sweep.uri is not None and state.mlflow:
        summary["mlflow"] = asdict(state.mlflow)
        _close_parent(sweep, summary, png, interrupted)
    (sweep.dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if not interrupted:
        state.finished = True
        sweep.save()
    say("")
    say(format_table(rows, sweep.keys))
    if best is not None:
        test = best["test_acc_at_best_val"]
        say(f"\n[tune] best trial {best['trial_id']}: val {best['best_val_acc']:.2f}%"
            + (f" (test at best val {test:.2f}%)" if test is not None else "")
            + " with " + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
    if summary["registered"]:
        reg = summary["registered"]
        say(f"[tune] registered {reg['name']} version {reg['version']}"
            + (" (champion)" if reg.get("champion") else " (the champion stays)"))
    if png:
        say(f"[tune] val accuracy over the search space: {png}")
    if interrupted:
        say(f"[tune] the sweep did not finish; continue it with `l2t-dist tune --resume {sweep.dir}`")
    return summary


def _close_parent(sweep: Sweep, summary: dict, png: Optional[Path], interrupted: bool) -> None:
    from l2t_dist.tracking.runs import client as mlflow_client

    ml = sweep.state.mlflow
    client = mlflow_client(ml.uri)
    parent = ml.parent_run_id
    for name in ("completed", "stopped_early", "failed"):
        client.log_metric(parent, f"trials_{name}", summary[name])
    if png:
        client.log_artifact(parent, str(png))
    client.log_artifact(parent, str(sweep.dir / "job.yaml"))
    if summary["best"] is not None:
        _log_best(sweep, client, summary, interrupted)
    if not interrupted:
        client.set_terminated(parent, status="FINISHED")


def _log_best(sweep: Sweep, client, summary: dict, interrupted: bool) -> None:
    """The best trial on the parent run, and its checkpoint registered when the sweep finished."""
    from l2t_dist.tracking.runs import log_params

    parent, name, best = sweep.state.mlflow.parent_run_id, sweep.state.register, summary["best"]
    child = sweep.callback().child_run_id(best["trial_id"])
    best["mlflow_run_id"] = child
    val = _checkpoint_val(best) if best["checkpoint"] else None
    val = best["best_val_acc"] if val is None else val
    client.log_metric(parent, "best_val_acc", val)
    if best["test_acc_at_best_val"] is not None:
        client.log_metric(parent, "best_test_acc", best["test_acc_at_best_val"])
    log_params(client, parent, {f"best.{k}": v for k, v in best["params"].items()})
    for k, v in {"best.trial_id": best["trial_id"], "best.run_id": child or "",
                 "best.run_dir": best["run_dir"]}.items():
        client.set_tag(parent, k, v)
    if not (name and best["checkpoint"] and child and not interrupted):
        return
    from l2t_dist.tracking.registry import register_checkpoint

    try:
        reg = register_checkpoint(child, best["checkpoint"], name, val_acc=val, tracking_uri=sweep.state.mlflow.uri)
    except L2TError as err:  # the sweep's results stand; the command then exits non-zero
        summary["registered"] = {"name": name, "error": str(err)}
        client.set_tag(parent, "registration_error", str(err)[:5000])
        sweep.say(f"[tune] error: the best model was not registered: {err}")
    else:
        summary["registered"] = {"name": name, **reg}
        client.set_tag(parent, "registered_model", name)
        client.set_tag(parent, "registered_version", str(reg.get("version")))


def _checkpoint_val(best: dict) -> Optional[float]:
    """The val accuracy stored with best.pt: the number that belongs to the registered weights."""
    from l2t_dist.errors import CheckpointError
    from l2t_dist.train.state import TrainingState

    try:
        v = TrainingState.load(Path(best["checkpoint"])).best["val_acc"]
    except CheckpointError:  # fall back to Tune's number
        return None
    return float(v) if v is not None else None
