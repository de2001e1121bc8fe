"""`l2t-dist tune`: hyper-parameter sweeps of a job with Ray Tune (docs/tune.md).

space.py   search-space YAML: loading and validation (no Ray; fast failures)
plan.py    trial resources and concurrency, checked before anything starts (no Ray)
trial.py   the trainable: one full training job per trial (local or Ray Train inside)
mlflow_runs.py  the driver-side Tune callback that writes the MLflow parent/child runs
asha.py    ASHA whose rungs are rebuilt on --resume
report.py  the summary table and the val-accuracy scatter PNG
sweep.py   the Tuner: search algorithm, ASHA, storage, resume, best model registration

Ray and MLflow are imported only inside functions that run a sweep (mlflow_runs.py and
asha.py import Ray at the top, and are imported only then).
"""
