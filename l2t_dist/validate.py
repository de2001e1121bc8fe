"""What `l2t-dist job` checks beyond the schema: everything train would build from the job
alone, without data or checkpoints.

The schema (config.py) knows keys and values, not architectures, so an unknown tap
(`sources.0.taps=[99]`), an explicit pair naming an unknown source or tap, a preset that
cannot be formed (single/one_to_one with no target tap of the same size) or an image size too
small for a network used to pass `l2t-dist job` and fail only in `train`. Here the job is
built the way train builds it, by train's own code (train/build.py:build_trainee), on
weightless copies of the architectures: tap shapes and pairs do not depend on weights, so
the errors are exactly train's. The copies are small (a second at most), and the caller's
random-number state is left as it was.
"""

from __future__ import annotations

from contextlib import contextmanager

from l2t_dist.config import JobConfig

PLACEHOLDER_CLASSES = 10  # classes are known only from the data / checkpoint; taps and pairs do not depend on them


def skeleton_sources(job: JobConfig) -> list:
    """The job's sources as freshly initialised models (no checkpoint read), with the taps
    they offer resolved as the loader resolves them."""
    from l2t_dist.models import build_model
    from l2t_dist.sources.colocated import LoadedSource, offered_taps

    out = []
    for cfg in job.sources:
        model = build_model(cfg.arch, cfg.num_classes or PLACEHOLDER_CLASSES).eval()
        out.append(LoadedSource(cfg.name, cfg.arch, model, offered_taps(model, cfg.taps)))
    return out


@contextmanager
def tiny_torch_work():
    """For building and probing small throwaway models: one thread (tiny tensors only contend
    for more) and the caller's random-number state left as it was."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


def build_skeleton(job: JobConfig):
    """train's Trainee for the job (target, pairs, student, objective, step) on weightless
    models; raises train's ConfigError for taps, pairs and image sizes that do not work."""
    import torch

    from l2t_dist.train.build import build_trainee

    with tiny_torch_work():
        return build_trainee(job, PLACEHOLDER_CLASSES, torch.device("cpu"), sources=skeleton_sources(job),
                             target_weights=False)


def check_job(job: JobConfig):
    """The skeleton Trainee; ConfigError (train's message) unless train can build this job's
    models and pairs."""
    trainee = build_skeleton(job)
    with tiny_torch_work():
        for model in (trainee.target, *(s.model for s in trainee.sources)):
            model.tap_shapes(job.data.image_size)  # every network must run at data.image_size, with pairs or not
    if job.cluster.sync_bn:
        from l2t_dist.distributed.sync_bn import check_sync_bn

        check_sync_bn(trainee.objective.student)  # the student's BN layers are the ones synchronised
    return trainee
