"""MLflow experiment tracking and the model registry: an edge of the project, never the core.

Nothing here is imported by `l2t_dist.train` or the other core packages; the CLI and the Ray
launcher attach the tracking callback. Modules import mlflow lazily (it takes seconds), so
`uri.py` can resolve and probe a tracking URI before any heavy import, data or model.

  uri.py         resolve_tracking_uri, check_tracking_uri (fail fast), server_down, mlflow_available
  runs.py        MlflowClient helpers: experiments, params, metric names, mlflow_run.json, pending
  store.py       sqlite stores: created/upgraded under a file lock; the registry lock
  breaker.py     bounded HTTP calls and the circuit breaker for a server that stops answering
  sender.py      the background thread that sends each epoch
  sysmetrics.py  MLflow's system-metrics monitor (CPU, memory, GPU) behind the breaker
  finish.py      what a run holds: an epoch, a back-fill, on_end's completion (model, registry)
  callback.py    MlflowCallback (training-loop callback, rank 0) and start_tracking (the session)
  registry.py    register_checkpoint and the champion rule (safe with concurrent runs); signatures
  sync.py        `l2t-dist models sync RUN_DIR`: complete a run whose server stopped answering
  plots.py       λ heat-map and learning curves (matplotlib, Agg canvas)
  models_cli.py  `l2t-dist models list|show|load|sync`
"""
