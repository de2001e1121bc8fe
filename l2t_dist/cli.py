"""The `l2t-dist` command. Heavy imports happen inside the sub-commands, so `--help` is fast.

Exit codes: 0 success, 2 bad input (job, data, checkpoint, option), 3 failure at run time.
"""

from __future__ import annotations

import argparse
import json
import sys

from l2t_dist import __version__
from l2t_dist.errors import L2TError

EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 3
ARCH_HELP = "architecture: a built-in name (e.g. l2t_resnet32), tv:NAME (torchvision) or timm:NAME (timm)"
UNSAFE_HELP = ("DANGEROUS: unpickle the checkpoint in full if it holds Python objects beyond tensors; that runs "
               "any code the file holds, so use it only for files you trust")


def _add_sources(sub) -> None:
    sources = sub.add_parser("sources", help="inspect and evaluate source checkpoints")
    ssub = sources.add_subparsers(dest="action", required=True)

    ins = ssub.add_parser("inspect", help="print a model's feature taps and a checkpoint's metadata")
    ins.add_argument("checkpoint", nargs="?", help="checkpoint file; omit to inspect the architecture itself")
    ins.add_argument("--arch", required=True, help=ARCH_HELP)
    ins.add_argument("--image-size", type=int, default=32, help="input side at which the tap sizes are shown")
    ins.add_argument("--num-classes", type=int, default=None)
    ins.add_argument("--allow-unsafe-pickle", action="store_true", help=UNSAFE_HELP)
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.set_defaults(func=_cmd_sources_inspect)

    ev = ssub.add_parser("eval", help="top-1 accuracy of a checkpoint on a dataset split")
    ev.add_argument("checkpoint")
    ev.add_argument("--arch", required=True, help=ARCH_HELP)
    ev.add_argument("--data", required=True, metavar="KIND:PATH",
                    help="e.g. parquet:../shared/data/cifar10-exact-subset")
    ev.add_argument("--split", required=True,
                    help="split as named on disk (train, test, val, or a parquet shard prefix)")
    ev.add_argument("--holdout", choices=("all", "train", "val"), default="all",
                    help="evaluate on the whole split, or on the train/val part of the protocol's 10%% hold-out")
    ev.add_argument("--image-size", type=int, default=32)
    ev.add_argument("--batch-size", type=int, default=500)
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    ev.add_argument("--allow-unsafe-pickle", action="store_true", help=UNSAFE_HELP)
    ev.add_argument("--json", action="store_true", help='last line: {"top1": <percent>, "n": <images>}')
    ev.set_defaults(func=_cmd_sources_eval)


def _add_train(sub) -> None:
    tr = sub.add_parser("train", help="train a target network with a transfer method")
    tr.add_argument("job", nargs="?", help="job YAML file (omit: the schema defaults plus the overrides)")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. method.beta=1.0")
    tr.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="local: one process, no Ray; ray: data-parallel workers on Ray Train, served sources "
                         "(the job's cluster section; see docs/distributed.md)")
    tr.add_argument("--address", default=None,
                    help="with --backend ray: the Ray cluster to join (same as cluster.address=...)")
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--json", action="store_true", help="print the final summary as one JSON line")
    tr.set_defaults(func=_cmd_train)

    job = sub.add_parser("job", help="validate a job file (schema, taps and pairs of its architectures; no data or "
                                     "checkpoints are read) and print it with every default filled in")
    job.add_argument("job", nargs="?", help="job YAML file to validate and print (omit: the schema defaults)")
    job.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. method.name=fm")
    job.add_argument("--schema-md", action="store_true",
                     help="print the reference of every job key as Markdown (docs/jobs.md) and exit")
    job.set_defaults(func=_cmd_job)


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="the whole method on synthetic data: pretrain sources, transfer, compare")
    demo.add_argument("--out", default="runs/demo", help="output folder (must be empty or absent)")
    demo.add_argument("--quick", action="store_true", help="a few epochs only (smoke test)")
    demo.add_argument("--backend", choices=("ray", "local"), default="ray",
                      help="ray: local Ray, served sources, 2 Ray Train workers; local: one process, no Ray")
    demo.add_argument("--data-root", metavar="KIND:PATH", default=None,
                      help="real target data instead of the synthetic task, e.g. parquet:../shared/data/cifar10-jpeg")
    demo.add_argument("--source", metavar="ARCH:CHECKPOINT", action="append", default=[],
                      help="a real source checkpoint instead of pretraining (repeat for several)")
    demo.add_argument("--per-class", type=int, default=10, help="target training images per class")
    demo.add_argument("--seed", type=int, default=0, help="seed of the target runs (the sources are always seed 0)")
    demo.add_argument("--tracking-uri", default=None,
                      help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    demo.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from l2t_dist.demo import run_demo

    result = run_demo(args.out, quick=args.quick, backend=args.backend, data_root=args.data_root,
                      source_specs=args.source, tracking_uri=args.tracking_uri, per_class=args.per_class,
                      seed=args.seed)
    if args.json:
        print(json.dumps(result, default=str))
    return 0


def _add_tune(sub) -> None:
    def positive(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
        return int(text)

    tu = sub.add_parser("tune", help="hyper-parameter sweep of a job with Ray Tune, ASHA on val accuracy, "
                                     "tracked in MLflow (see docs/tune.md)")
    tu.add_argument("job", nargs="?", help="job YAML file (omit: the schema defaults plus the overrides)")
    tu.add_argument("overrides", nargs="*", help="section.key=value overrides of the base job")
    tu.add_argument("--space", metavar="SPACE.yaml", help="search space, e.g. tune_spaces/beta_T.yaml")
    tu.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="local: each trial trains in its own process; ray: each trial runs a data-parallel "
                         "TorchTrainer (the job's cluster section)")
    tu.add_argument("--address", default=None, help="the Ray cluster to join (same as cluster.address=...)")
    tu.add_argument("--name", default=None, help="sweep name (default RUN.NAME-SPACE); the sweep folder is "
                                                 "OUT_DIR/NAME")
    tu.add_argument("--num-samples", type=positive, default=None, help="trials (overrides the space file)")
    tu.add_argument("--max-concurrent", type=positive, default=None,
                    help="trials at once (overrides the space file; lowered to what fits)")
    tu.add_argument("--register", metavar="MODEL", default=None,
                    help="register the best trial's model under this name (default: tracking.registered_model, "
                         "else RUN.NAME-tune)")
    tu.add_argument("--no-register", action="store_true", help="do not register the best model")
    tu.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep")
    tu.add_argument("--quiet", action="store_true", help="only the final table")
    tu.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    tu.set_defaults(func=_cmd_tune)


def _cmd_tune(args) -> int:
    from l2t_dist.tune.sweep import run_sweep

    job, overrides = (None, []) if args.resume else _job_and_overrides(args)
    summary = run_sweep(job, overrides, args.space, backend=args.backend, name=args.name, address=args.address,
                        num_samples=args.num_samples, max_concurrent=args.max_concurrent, register=args.register,
                        no_register=args.no_register, resume=args.resume, quiet=args.quiet)
    if args.json:
        print(json.dumps(summary))
    if summary["interrupted"]:
        return 130
    return EXIT_RUNTIME if (summary.get("registered") or {}).get("error") else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2t-dist",
        description="Multi-source transfer learning with L2T-ww (Learning What and Where to Transfer).")
    parser.add_argument("--version", action="version", version=f"l2t-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sources(sub)
    _add_train(sub)
    _add_demo(sub)
    _add_tune(sub)
    from l2t_dist.tracking.models_cli import add_parser as _add_models  # light: no mlflow at import

    _add_models(sub)
    return parser


def _parse_data(spec: str) -> tuple[str, str]:
    from l2t_dist.errors import ConfigError

    kind, sep, path = spec.partition(":")
    if not sep:
        raise ConfigError(f"--data {spec!r} must look like KIND:PATH, e.g. parquet:../shared/data/cifar10-jpeg")
    return kind, path


def _cmd_sources_inspect(args) -> int:
    from l2t_dist.sources.inspect import inspect_source

    report = inspect_source(args.checkpoint, args.arch, args.image_size, args.num_classes,
                            allow_unsafe_pickle=args.allow_unsafe_pickle)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"architecture: {report['arch']}  classes: {report['num_classes']}  "
          f"embedding: {report['embedding_dim']}  parameters: {report['parameters']:,}")
    if report["checkpoint"]:
        print(f"checkpoint:   {report['checkpoint']}")
        for key, value in report["meta"].items():
            print(f"  {key}: {value}")
    print(f"taps at {args.image_size}x{args.image_size} input:")
    width = max([12] + [len(t["name"]) for t in report["taps"]])
    print(f"  {'#':>3}  {'name':<{width}} {'channels':>8}  {'size':>9}  {'stride':>6}")
    for i, tap in enumerate(report["taps"]):
        size = f"{tap['height']}x{tap['width']}"
        print(f"  {i:>3}  {tap['name']:<{width}} {tap['channels']:>8}  {size:>9}  {tap['stride']:>6}")
    return 0


def _cmd_sources_eval(args) -> int:
    from l2t_dist.sources.evaluate import evaluate_checkpoint

    kind, path = _parse_data(args.data)
    result = evaluate_checkpoint(args.checkpoint, args.arch, kind, path, args.split,
                                 image_size=args.image_size, batch_size=args.batch_size,
                                 holdout=args.holdout, limit=args.limit,
                                 allow_unsafe_pickle=args.allow_unsafe_pickle)
    if not args.json:
        print(f"{args.arch} on {kind}:{path} [{args.split}/{args.holdout}]: "
              f"top-1 {result['top1']:.2f}% over {result['n']} images")
    else:
        print(json.dumps(result))
    return 0


def _job_and_overrides(args) -> tuple:
    """`l2t-dist train method.beta=1` has no job file: the first word is then an override."""
    if args.job and "=" in args.job and not args.job.endswith((".yaml", ".yml")):
        return None, [args.job, *args.overrides]
    return args.job, args.overrides


def _cmd_job(args) -> int:
    from l2t_dist.config import dump_job, load_job

    if args.schema_md:
        from l2t_dist.schema_docs import render

        print(render(), end="")
        return 0
    job = load_job(*_job_and_overrides(args))
    from l2t_dist.validate import check_job  # imports torch: builds the models without weights

    check_job(job)  # taps, pairs, image size: train's own errors, without data or checkpoints
    print(dump_job(job), end="")
    return 0


def train_job(job, resume=None, backend: str = "local", quiet: bool = False, address=None):
    """A training run with its MLflow run (when tracking is on): the one path of `l2t-dist
    train` and of the demo. The MLflow run ends FAILED (KILLED on Ctrl-C), never RUNNING."""
    from l2t_dist.tracking.callback import close, start_tracking  # MLflow itself is imported lazily

    tracker = start_tracking(job, resume)  # an unreachable store fails here, before data and models
    try:
        if backend == "ray":
            from l2t_dist.distributed.launcher import train_ray  # imports Ray only here

            summary = train_ray(job, resume=resume, quiet=quiet, address=address, tracking=tracker)
        else:
            from l2t_dist.train.local import train_local

            summary = train_local(job, resume=resume, quiet=quiet, callbacks=[tracker] if tracker else ())
    except BaseException as err:
        close(tracker, err)
        raise
    close(tracker, None)
    return summary


def _cmd_train(args) -> int:
    from l2t_dist.config import load_job

    job = load_job(*_job_and_overrides(args)) if not args.resume else None
    summary = train_job(job, args.resume, args.backend, args.quiet, args.address)
    if args.json:
        print(json.dumps(summary.to_dict()))
    return 0


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but `key=value` overrides may also come after the options
    (`l2t-dist train JOB --quiet method.beta=1`), which argparse alone rejects."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    try:
        return args.func(args)
    except L2TError as err:
        print(f"error: {err}", file=sys.stderr)
        if getattr(args, "json", False):  # scripts reading the last stdout line get the failure too
            print(json.dumps({"error": str(err), "kind": type(err).__name__, "exit_code": err.exit_code}))
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
