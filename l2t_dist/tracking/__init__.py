"""MLflow experiment tracking and the model registry: an edge of the project, never the core.

Nothing here is imported by `l2t_dist.train` or the other core packages; the CLI and the Ray
launcher attach the tracking callback. Modules import mlflow lazily (it takes seconds), so
`uri.py` can resolve and probe a tracking URI before any heavy import, data or model.

  uri.py         resolve_tracking_uri, check_tracking_uri (fail fast), mlflow_available
  runs.py        MlflowClient helpers: experiments, params, metric names, mlflow_run.json
  callback.py    MlflowCallback (LocalRun callback, rank 0) and start_tracking (the session)
  registry.py    register_checkpoint and the champion rule; signature checks
  plots.py       λ heat-map and learning curves (matplotlib, Agg canvas)
  models_cli.py  `l2t-dist models list|show|load`
"""
