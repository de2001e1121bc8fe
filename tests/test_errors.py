"""Typed failures (l2t_dist/errors.py): what a distributed runner retries, what it stops on,
and our own error found under Ray's real wrapper types."""

import pickle

import pytest

from l2t_dist.errors import (
    AgreedFailure,
    CheckpointError,
    ConfigError,
    L2TError,
    RetryableError,
    TrainingError,
    last_line,
    unwrap_ray_error,
)


def test_kinds_are_types_not_flags():
    assert RetryableError("actor gone").retryable and issubclass(RetryableError, TrainingError)
    assert RetryableError("x").exit_code == 3
    for cls in (ConfigError, CheckpointError, TrainingError):
        assert not cls("x").retryable
    agreed = AgreedFailure(CheckpointError("missing on node 1"))
    assert str(agreed) == "missing on node 1" and agreed.exit_code == 2 and not agreed.retryable
    again = pickle.loads(pickle.dumps(agreed))  # a Ray worker's return value crosses processes
    assert isinstance(again, AgreedFailure) and isinstance(again.error, CheckpointError)
    assert str(again.error) == "missing on node 1"


def test_unwrap_finds_our_error_under_rays_wrappers():
    exceptions = pytest.importorskip("ray.exceptions")
    from ray.train.v2.api.exceptions import WorkerGroupError

    ours = TrainingError("non-finite loss at iteration 3")
    wrapped = exceptions.RayTaskError("features", "Traceback ...\nTrainingError: non-finite loss", ours)
    as_cause = wrapped.as_instanceof_cause()  # what ray.get raises: a subclass of our class
    assert isinstance(as_cause, TrainingError) and type(as_cause) is not TrainingError
    assert unwrap_ray_error(as_cause) is ours
    group = WorkerGroupError("workers failed", {1: RuntimeError("rank 1 crashed"), 0: as_cause})
    assert unwrap_ray_error(group) is ours  # rank 0 first, under two wrappers
    assert unwrap_ray_error(AgreedFailure(ours)) is ours
    try:
        try:
            raise ours
        except TrainingError as inner:
            raise RuntimeError("wrapped by hand") from inner
    except RuntimeError as outer:
        assert unwrap_ray_error(outer) is ours
    assert unwrap_ray_error(RuntimeError("nothing of ours")) is None
    assert unwrap_ray_error(None) is None
    assert last_line(RuntimeError("Traceback\n  File x\n\nValueError: the end  \n")) == "ValueError: the end"


def test_every_error_is_an_l2terror_with_an_exit_code():
    for cls in (ConfigError, CheckpointError, TrainingError, RetryableError):
        assert issubclass(cls, L2TError) and cls("x").exit_code in (2, 3)
