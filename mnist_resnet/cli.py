"""Shared plumbing of the command-line entry points.

A user-caused problem (bad flag, bad config value, broken file) ends the
program with one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, NoReturn

from absl import app
from absl import flags

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
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # An unknown config key, a value of the wrong type, a missing config
    # file: all reported before anything is imported or compiled.
    fail(str(e).splitlines()[0])


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run` with one-line flag errors (exit 2)."""
  app.run(main, flags_parser=_parse_flags)
