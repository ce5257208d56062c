"""Errors a user can fix. The CLI prints their message as one line, with no traceback.

Library code raises these instead of printing or exiting, so tests (and other programs) can catch
them. `exit_code` follows the usual shell convention: 2 for a wrong command line, 1 for a failure
at run time (bad file, missing data, full disk).
"""


class FmnistError(Exception):
    """A runtime problem the user can fix (exit code 1)."""

    exit_code = 1


class UsageError(FmnistError):
    """The command line or config asked for something impossible (exit code 2)."""

    exit_code = 2


class DataError(FmnistError):
    """The dataset is missing, truncated, corrupt or of the wrong kind."""


class CheckpointError(FmnistError):
    """A checkpoint is missing, unreadable or belongs to another model or program."""


class TrainingInterrupted(FmnistError):
    """Training stopped on SIGINT/SIGTERM after saving a resumable checkpoint."""

    exit_code = 130


class NonFiniteLoss(FmnistError):
    """The training loss became NaN or infinite; training stopped before saving the broken weights."""
