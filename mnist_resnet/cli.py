"""Shared plumbing of the command-line entry points.

A user-caused problem (bad flag, bad config value, broken file) ends the
program with one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import sys
from typing import Any, Callable, NoReturn

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) says nothing a
# user of this project can act on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from mnist_resnet.errors import EXIT_USER_ERROR, MnistResnetError


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors():
  """Turns MnistResnetError into one stderr line and exit code 2."""
  try:
    yield
  except MnistResnetError as e:
    fail(_first_line(e))


def _parse_flags(argv: list[str]) -> list[str]:
  # An unknown config key, a value of the wrong type, a missing or broken
  # config file: all reported before anything is imported or compiled.
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(_first_line(e))
  except (AttributeError, KeyError) as e:
    # ml_collections reports an override of an undefined key this way: a
    # KeyError("'key'\nDid you mean ...?"), possibly inside an AttributeError.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    key, _, hint = str(e.args[0] if e.args else e).partition("\n")
    hint = f"; {hint.strip()}" if hint.strip() else ""
    fail(f"unknown config key {key.strip(chr(39))}{hint} (keys are those of "
         "configs/default.py)")
  except Exception as e:  # pylint: disable=broad-except
    fail(f"bad config: {type(e).__name__}: {_first_line(e)}")


def config_value(holder: flags.FlagHolder) -> Any:
  """The parsed config; a config file that failed to load is a user error
  (ml_collections defers that error until the config is first read)."""
  try:
    value = holder.value
    value.keys()  # A failed load only raises once the config is read.
    return value
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    fail(f"could not load config file: {lines[-1] if lines else e}")


def _first_line(e: BaseException) -> str:
  text = str(e).strip().strip('"')
  return text.splitlines()[0] if text else type(e).__name__


class _QuietLibraries(py_logging.Filter):
  """Drops the INFO chatter of orbax, TensorFlow and JAX; keeps warnings."""

  _NOISY = tuple(os.sep + name + os.sep for name in (
      "orbax", "tensorflow", "jax"))

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(
        n in record.pathname for n in self._NOISY)


class _ProcessTag(py_logging.Filter):
  """Prefixes every log line with the process index in multi-host runs."""

  def __init__(self, tag: str):
    super().__init__()
    self._tag = tag

  def filter(self, record: py_logging.LogRecord) -> bool:
    record.msg = f"{self._tag} {record.msg}"
    return True


def tag_logs_with_process() -> None:
  """Call once the process count is known (after distributed start-up)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    logging.get_absl_handler().addFilter(
        _ProcessTag(f"[process {jax.process_index()}/{jax.process_count()}]"))


def setup_logging() -> None:
  """INFO logging for the project, quiet libraries."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run` with one-line flag errors (exit 2) and quiet libraries."""
  def wrapped(argv):
    setup_logging()
    main(argv)
  app.run(wrapped, flags_parser=_parse_flags)
