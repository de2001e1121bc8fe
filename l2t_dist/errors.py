"""Error types that the CLI turns into clear messages and distinct exit codes, and the one
place where failures of distributed runs are classified.

Bad input (a typo in a job, a missing dataset, a mismatched checkpoint) exits 2;
a failure at run time (a NaN loss, an unreachable service) exits 3.

Three kinds matter to a distributed runner, and each is a type, never a flag set later:
- a user error (every L2TError that is not retryable): the same input fails the same way
  again, so the run stops at once instead of restarting workers;
- a `RetryableError` (a source actor that died or timed out): it may not repeat and one
  rank alone sees it, so the worker raises it and Ray Train restarts the group from the
  last checkpoint;
- an `AgreedFailure`: a user error that every rank raised at the same point (agreed with a
  collective), so the group can finish together and the driver raises `.error` once.
"""

from __future__ import annotations

from typing import Optional


class L2TError(Exception):
    """Base class: the message is shown to the user as-is, without a traceback."""

    exit_code = 2
    retryable = False


class ConfigError(L2TError):
    """A job file, override or command-line option is invalid."""


class DataError(L2TError):
    """A dataset is missing, malformed, or holds a corrupt image."""


class CheckpointError(L2TError):
    """A checkpoint is missing, unreadable, or does not fit the architecture."""


class TrainingError(L2TError):
    """Training cannot go on (for example a NaN or Inf loss)."""

    exit_code = 3


class RetryableError(TrainingError):
    """A failure that one worker sees and that a restart may cure (a source actor died or
    gave no answer in time)."""

    retryable = True


class AgreedFailure(L2TError):
    """Every rank raised `error` at the same point of the loop: nobody waits in a collective,
    and nothing is to be retried."""

    def __init__(self, error: L2TError):
        super().__init__(str(error))
        self.error = error
        self.exit_code = error.exit_code

    def __reduce__(self):  # crosses process boundaries (a Ray worker's return value)
        return AgreedFailure, (self.error,)


def unwrap_ray_error(err: Optional[BaseException]) -> Optional[L2TError]:
    """Our own error under Ray's wrappers, or None.

    Ray wraps a remote exception in a RayTaskError (the original is `.cause`), Ray Train in a
    TrainingFailedError (`.worker_failures` by rank, rank 0 first); our errors may also be an
    `AgreedFailure` or a chained `__cause__`. A RayTaskError for our error is itself an
    instance of our class (Ray subclasses it dynamically), with Ray's traceback as its text, so
    only an instance of one of the classes defined here counts as found."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, AgreedFailure):
            return node.error
        if isinstance(node, L2TError) and type(node).__module__ == __name__:
            return node
        failures = getattr(node, "worker_failures", None) or {}
        ordered = [failures[k] for k in sorted(failures)] if isinstance(failures, dict) else list(failures)
        stack.extend(reversed([getattr(node, "cause", None), node.__cause__, *ordered]))
    return None


def last_line(err: BaseException) -> str:
    """The last non-empty line of an error's text (Ray's tracebacks end with the message)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
