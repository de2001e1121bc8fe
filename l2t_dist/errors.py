"""Error types that the CLI turns into clear messages and distinct exit codes.

Bad input (a typo in a job, a missing dataset, a mismatched checkpoint) exits 2;
a failure at run time (a NaN loss, an unreachable service) exits 3.
"""


class L2TError(Exception):
    """Base class: the message is shown to the user as-is, without a traceback."""

    exit_code = 2
    # False: the same input fails the same way again, so a distributed runner stops at once
    # instead of restarting workers. True: the failure may not repeat, or concerns one worker
    # only (a source service that died or timed out), so Ray Train's restart policy handles it.
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
