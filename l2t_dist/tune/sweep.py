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
from pathlib import Path
from typing import Any, Optional

from l2t_dist.config import JobConfig, dump_job, load_job, parse_job
from l2t_dist.errors import ConfigError, L2TError
from l2t_dist.tune.space import SearchSpace, apply_params, check_against_job, load_space, parse_space

SWEEP_FILE = "sweep.json"
METRIC, MODE = "val_acc", "max"


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


def _new_state(job_path, overrides, space_path, backend, name, num_samples, max_concurrent,
               register) -> tuple[dict, Path]:
    job = load_job(job_path, overrides)
    space = load_space(space_path)
    check_against_job(space, job)
    if num_samples is not None:
        space.num_samples = num_samples
    if max_concurrent is not None:
        space.max_concurrent_trials = max_concurrent
    max_t = space.scheduler.max_t or job.optim.epochs
    if space.scheduler.name == "asha" and space.scheduler.grace_period > max_t:
        raise ConfigError(f"search space {space.path!r}: scheduler.grace_period={space.scheduler.grace_period} "
                          f"exceeds the epochs of a trial ({max_t}); lower it or raise optim.epochs / scheduler.max_t")
    base = _absolute(job.model_dump(mode="json"))
    base["optim"]["epochs"] = max_t
    sweep_name = name or f"{job.run.name}-{Path(space_path).stem}"
    sweep_dir = (Path(job.run.out_dir) / sweep_name).resolve()
    if (sweep_dir / SWEEP_FILE).exists():
        raise ConfigError(f"sweep folder {str(sweep_dir)!r} already holds a sweep; continue it with "
                          f"`l2t-dist tune --resume {sweep_dir}`, or pick another --name")
    state = {"version": 1, "name": sweep_name, "backend": backend, "space_path": str(space_path),
             "space": space.to_dict(), "base": base, "max_t": max_t,
             "register": register if register is not None else (job.tracking.registered_model or
                                                                 f"{job.run.name}-tune"),
             "mlflow": None}
    return state, sweep_dir


def _load_state(resume: str) -> tuple[dict, Path]:
    sweep_dir = Path(resume).resolve()
    f = sweep_dir / SWEEP_FILE
    if not f.is_file():
        raise ConfigError(f"--resume {resume!r}: no {SWEEP_FILE} there; give the folder of a sweep, "
                          "OUT_DIR/<sweep name>, as printed when it started")
    if not (sweep_dir / "tune").is_dir():
        raise ConfigError(f"--resume {resume!r}: the sweep never reached Ray Tune (no tune/ folder); "
                          f"remove {str(sweep_dir)!r} and start it again")
    return json.loads(f.read_text()), sweep_dir


def _save_state(state: dict, sweep_dir: Path) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / f".{SWEEP_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, sweep_dir / SWEEP_FILE)


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


def _scheduler(space: SearchSpace, max_t: int, sweep_dir: Path):
    from ray.tune.schedulers import FIFOScheduler

    s = space.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    from l2t_dist.tune.asha import ResumableASHA

    # time_attr "epoch": our own counter, which a resumed trial continues (training_iteration restarts)
    return ResumableASHA(str(sweep_dir), time_attr="epoch", max_t=max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _trainable(state: dict, sweep_dir: Path, plan):
    from ray import tune

    from l2t_dist.tune.trial import run_trial

    spec = {"base": state["base"], "keys": list(state["space"]["params"]), "sweep_dir": str(sweep_dir),
            "backend": state["backend"]}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), plan.trial_resources)


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
        state, sweep_dir = _load_state(resume)
        if state.get("finished"):
            raise ConfigError(f"--resume {resume!r}: this sweep has finished; its summary is in "
                              f"{str(sweep_dir / 'summary.json')!r}. Start a new one with another --name")
    else:
        if space_path is None:
            raise ConfigError("--space SPACE.yaml is required (ready-made spaces are in tune_spaces/)")
        state, sweep_dir = _new_state(job_path, overrides, space_path, backend, name, num_samples, max_concurrent,
                                      register)
    if no_register:
        state["register"] = None
    space = parse_space(state["space"], state["space_path"])
    job = parse_job(state["base"], where=f"sweep {str(sweep_dir)!r}")
    search = search_name(space)
    if state.get("mlflow"):  # resuming: the store the sweep started in, wherever this runs from
        from l2t_dist.tracking.uri import check_tracking_uri

        uri = state["mlflow"]["uri"]
        check_tracking_uri(uri)
    else:
        uri = _tracking(job)

    from l2t_dist.distributed.launcher import connect  # imports Ray from here on

    if address:
        job.cluster.address = address
    started_ray = connect(job.cluster, quiet=quiet)
    try:
        return _run(state, sweep_dir, space, job, search, uri, resume is not None, quiet)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _run(state: dict, sweep_dir: Path, space: SearchSpace, job: JobConfig, search: str, uri: Optional[str],
         resuming: bool, quiet: bool) -> dict:
    from ray import tune

    from l2t_dist.distributed.launcher import cluster_snapshot
    from l2t_dist.tune.plan import plan_trials

    _, total, nodes = cluster_snapshot()
    plan = plan_trials(job, state["backend"], space.max_concurrent_trials, total, nodes)
    if plan.job_overrides:
        state["base"] = apply_params(state["base"], plan.job_overrides)
    keys = list(space.params)
    max_t = state["max_t"]
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    say(f"[tune] sweep {state['name']} in {sweep_dir}: {space.num_samples} trials of {max_t} epochs, search "
        f"{search}, scheduler {space.scheduler.name}, backend {state['backend']}")
    say(f"[tune] resources: {plan.describe()}; cluster: {total}")
    for note in plan.notes:
        say(f"[tune] note: {note}")

    callbacks = []
    if uri is not None:
        callbacks.append(_mlflow(state, sweep_dir, space, job, search, plan, uri, keys, max_t))
    _save_state(state, sweep_dir)
    (sweep_dir / "job.yaml").write_text(dump_job(parse_job(state["base"], where="sweep base job")))

    trainable = _trainable(state, sweep_dir, plan)
    tune_dir = sweep_dir / "tune"
    if resuming:
        say(f"[tune] resuming {tune_dir}")
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, restart_errored=True)
    else:
        search_alg, limit = _searcher(space, search, plan.concurrency)
        tuner = tune.Tuner(
            trainable, param_space={k: p.domain() for k, p in space.params.items()},
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=search_alg,
                                        scheduler=_scheduler(space, max_t, sweep_dir), num_samples=space.num_samples,
                                        max_concurrent_trials=limit, trial_dirname_creator=_trial_dirname,
                                        # a local trial's process is reused by the next one
                                        # (no new Python and torch import per trial)
                                        reuse_actors=state["backend"] == "local"),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      verbose=0 if quiet else 1))
    try:
        results = tuner.fit()
    except Exception:
        # Tune itself broke (a Ctrl-C is handled by Tune: fit returns and the sweep is resumable)
        if uri is not None and state.get("mlflow"):
            from l2t_dist.tracking.runs import client

            client(uri).set_terminated(state["mlflow"]["parent_run_id"], status="FAILED")
        raise
    rows = collect(results, keys, max_t)
    return _finish(state, sweep_dir, space, rows, search, uri, say)


def _mlflow(state, sweep_dir, space, job, search, plan, uri, keys, max_t):
    from l2t_dist.tracking.runs import experiment_id
    from l2t_dist.tune import mlflow_runs

    ml = state.get("mlflow")
    if ml and ml.get("uri") == uri:
        mlflow_runs.reopen(uri, ml["parent_run_id"])
    else:
        exp_id = experiment_id(uri, job.tracking.experiment)
        params = {f"space.{k}": p.describe() for k, p in space.params.items()}
        params.update({"tune.num_samples": space.num_samples, "tune.max_concurrent_trials": plan.concurrency,
                       "tune.search": search, "tune.scheduler": json.dumps(vars(space.scheduler)),
                       "tune.max_t": max_t, "tune.backend": state["backend"], "tune.seed": space.seed})
        parent = mlflow_runs.start_parent(uri, exp_id, state["name"], tags={
            "l2t.kind": "tune-sweep", "l2t.sweep_dir": str(sweep_dir), "tune.space_file": state["space_path"]},
            params=params)
        ml = state["mlflow"] = {"uri": uri, "experiment_id": exp_id, "parent_run_id": parent}
        _save_state(state, sweep_dir)  # before any trial: a resumed sweep continues this run
    return mlflow_runs.MlflowSweepCallback(uri, ml["experiment_id"], ml["parent_run_id"], state["base"], keys,
                                           str(sweep_dir), max_t)


def _finish(state: dict, sweep_dir: Path, space: SearchSpace, rows: list[dict], search: str,
            uri: Optional[str], say) -> dict:
    from l2t_dist.tune.report import format_table, plot_val_acc

    keys = list(space.params)
    best = best_row(rows)
    png = plot_val_acc(rows, space, sweep_dir / "val_acc.png", f"{state['name']}: best val accuracy per trial")
    interrupted = any(r["status"] == "unfinished" for r in rows) or len(rows) < space.num_samples
    summary: dict[str, Any] = {
        "sweep": state["name"], "sweep_dir": str(sweep_dir), "backend": state["backend"], "search": search,
        "scheduler": space.scheduler.name, "epochs": state["max_t"], "trials": rows,
        "completed": sum(r["status"] == "completed" for r in rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows), "interrupted": interrupted,
        "png": str(png) if png else None, "best": None, "mlflow": None, "registered": None}
    if best is not None:
        run_dir = sweep_dir / best["trial_id"]
        summary["best"] = {k: best[k] for k in ("trial_id", "params", "best_val_acc", "test_acc_at_best_val",
                                                 "best_epoch", "epochs", "status")}
        summary["best"]["run_dir"] = str(run_dir)
        summary["best"]["checkpoint"] = str(run_dir / "best.pt") if (run_dir / "best.pt").exists() else None
    if uri is not None and state.get("mlflow"):
        summary["mlflow"] = dict(state["mlflow"])
        _close_parent(state, sweep_dir, summary, rows, keys, png, interrupted, say)
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if not interrupted:
        state["finished"] = True
        _save_state(state, sweep_dir)
    say("")
    say(format_table(rows, keys))
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
        say(f"[tune] the sweep did not finish; continue it with `l2t-dist tune --resume {sweep_dir}`")
    return summary


def _close_parent(state, sweep_dir, summary, rows, keys, png, interrupted, say) -> None:
    from l2t_dist.tracking.runs import client as mlflow_client, log_params

    ml = state["mlflow"]
    client = mlflow_client(ml["uri"])
    parent = ml["parent_run_id"]
    for name in ("completed", "stopped_early", "failed"):
        client.log_metric(parent, f"trials_{name}", summary[name])
    if png:
        client.log_artifact(parent, str(png))
    client.log_artifact(parent, str(sweep_dir / "job.yaml"))
    best = summary["best"]
    if best is not None:
        from l2t_dist.tune.mlflow_runs import MlflowSweepCallback

        finder = MlflowSweepCallback(ml["uri"], ml["experiment_id"], parent, state["base"], keys, str(sweep_dir),
                                     state["max_t"])
        child = finder.child_run_id(best["trial_id"])
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
        if state.get("register") and best["checkpoint"] and child and not interrupted:
            from l2t_dist.tracking.registry import register_checkpoint

            try:
                reg = register_checkpoint(child, best["checkpoint"], state["register"], val_acc=val,
                                          tracking_uri=ml["uri"])
            except L2TError as err:  # the sweep's results stand; the command then exits non-zero
                summary["registered"] = {"name": state["register"], "error": str(err)}
                client.set_tag(parent, "registration_error", str(err)[:5000])
                say(f"[tune] error: the best model was not registered: {err}")
            else:
                summary["registered"] = {"name": state["register"], **reg}
                client.set_tag(parent, "registered_model", state["register"])
                client.set_tag(parent, "registered_version", str(reg.get("version")))
    if not interrupted:
        client.set_terminated(parent, status="FINISHED")


def _checkpoint_val(best: dict) -> Optional[float]:
    """The val accuracy stored with best.pt: the number that belongs to the registered weights."""
    import torch

    try:
        meta = torch.load(best["checkpoint"], map_location="cpu", weights_only=False).get("meta", {})
    except Exception:  # noqa: BLE001 - fall back to Tune's number
        return None
    v = meta.get("best_val_acc")
    return float(v) if v is not None else None
