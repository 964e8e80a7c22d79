"""The project's own error types.

Anything a user can cause (a broken file, a bad config value, missing weights, a
diverging run) raises a subclass of `MnistResnetError` with a one-line message
that names the file or key and what is wrong. Entry points (`train.py`,
`python -m mnist_resnet.*`) print that line to stderr and exit with code 2;
everything else is a bug and keeps its traceback.
"""

import signal

EXIT_USER_ERROR = 2


def one_line(error: object, limit: int | None = None) -> str:
  """An error (or any message) as one line: whitespace collapsed, cut to
  `limit` characters; the exception's type name when it says nothing."""
  text = " ".join(str(error).strip().strip('"').split())
  if not text and isinstance(error, BaseException):
    text = type(error).__name__
  if limit is not None and len(text) > limit:
    text = text[:limit - 3] + "..."
  return text


class MnistResnetError(Exception):
  """Base class of every error a user can cause and fix."""


class DataError(MnistResnetError):
  """An MNIST file is missing, unreadable, corrupt or inconsistent."""


class ConfigError(MnistResnetError):
  """A config value is invalid."""


class WeightsError(MnistResnetError):
  """A pretrained weight file is missing, unreadable or does not fit the model."""


class WriteError(MnistResnetError):
  """A file cannot be written: disk full, out of inodes, read-only, no
  permission, a path through a regular file."""


class TrainingError(MnistResnetError):
  """Training cannot go on (for example a non-finite loss)."""


class Diverged(TrainingError):
  """The loss computed from the parameters of step `step - 1` is not finite:
  that state, and any checkpoint of it, is not good."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


# Exit code of a run stopped by a preemption notice (SIGTERM) after saving a
# checkpoint at the step it reached: sysexits.h's EX_TEMPFAIL, "try again".
# Rerunning the same command continues from that checkpoint.
EXIT_PREEMPTED = 75
# A run stopped by Ctrl-C: the shell's code for it, 128 + SIGINT.
EXIT_INTERRUPTED = 128 + signal.SIGINT


def exit_code_of_signal(signum: int) -> int:
  """The exit code of a run stopped by signal `signum` once its checkpoint
  is saved."""
  return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


class Preempted(Exception):
  """Raised once the checkpoint of a run stopped by a signal is on disk (SIGTERM
  or Ctrl-C, see preemption.py); not a user error."""

  def __init__(self, step: int, signum: int = signal.SIGTERM, *,
               finished: bool = False):
    reason = "interrupted" if signum == signal.SIGINT else "preempted"
    if finished:  # The signal came during the end-of-run report.
      message = (f"{reason} after the run finished at step {step}: "
                 "results.json is written")
    else:
      message = (f"{reason}: checkpoint saved at step {step}; rerun the "
                 "same command to continue")
    super().__init__(message)
    self.step = step
    self.signum = signum
