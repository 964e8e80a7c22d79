"""Shared plumbing of the command-line entry points.

A user-caused problem (bad flag, bad config value, broken file, a disk that
is full or read-only) ends the program with one line on stderr and exit code
2; no traceback. A program that ends with an error ends at once, whatever
library threads are still waiting (`exit_process`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging as py_logging
import os
import sys
import threading
import traceback
from typing import Any
from typing import Callable
from typing import NoReturn

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) says nothing a
# user of this project can act on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from mnist_resnet.core import files
from mnist_resnet.core.errors import EXIT_USER_ERROR
from mnist_resnet.core.errors import MnistResnetError
from mnist_resnet.core.errors import one_line

# How long the exit handlers (JAX's shutdown of a multi-process run among
# them) may take once a program has failed, before the process ends anyway.
EXIT_HANDLERS_TIMEOUT_S = 60.0


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors():
  """Turns MnistResnetError, and failed writes (disk full, read-only, ...:
  `files.write_failure`, also when a library wraps them), into one stderr
  line and exit code 2."""
  try:
    yield
  except MnistResnetError as e:
    fail(one_line(e))
  except Exception as e:  # pylint: disable=broad-except
    failure = files.write_failure(e)
    if failure is None:
      raise
    fail(one_line(failure))


def _parse_flags(argv: list[str]) -> list[str]:
  # An unknown config key, a value of the wrong type, a missing or broken
  # config file: all reported before anything is imported or compiled.
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(one_line(e))
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
    fail(f"bad config: {type(e).__name__}: {one_line(e)}")


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


class _QuietLibraries(py_logging.Filter):
  """Drops the INFO chatter of orbax, TensorFlow, JAX and matplotlib;
  keeps warnings."""

  # By source path: tests/test_cli.py::test_libraries_info_logs_stay_off_stderr
  # shows each library's lines (checked with orbax-checkpoint 0.12.8,
  # tensorstore 0.1.86, jax 0.10.2, tensorflow-cpu 2.21.0, matplotlib 3.11.2).
  _NOISY = tuple(os.sep + name + os.sep for name in (
      "orbax", "tensorflow", "jax", "matplotlib"))

  def filter(self, record: py_logging.LogRecord) -> bool:
    if _read_only_note(record):
      return False
    return record.levelno >= py_logging.WARNING or not any(
        n in record.pathname for n in self._NOISY)


def _read_only_note(record: py_logging.LogRecord) -> bool:
  """orbax's warnings that checkpoints are opened read-only: the tools that
  read a trained run (trained.load) do so on purpose."""
  # By message text: two warning lines per command without it, see
  # tests/test_evaluate.py::test_the_command_reports_user_errors_in_one_line
  # (checked with orbax-checkpoint 0.12.8, tensorstore 0.1.86).
  return (record.levelno == py_logging.WARNING and
          os.sep + "orbax" + os.sep in record.pathname and
          "read only" in record.getMessage().replace("_", " "))


class _ProcessTag(py_logging.Filter):
  """Prefixes every log line with the process index in multi-host runs."""

  def __init__(self, tag: str):
    super().__init__()
    self._tag = tag

  def filter(self, record: py_logging.LogRecord) -> bool:
    record.msg = f"{self._tag} {record.msg}"
    return True


class _ReportedWriteErrors(py_logging.Filter):
  """Drops orbax's error logs (with tracebacks, one per background thread)
  for a failed write or a directory gone: the same error reaches the main
  thread, which reports it in one line."""

  # By source path: without it, a save on a full disk prints orbax's error
  # lines and tracebacks, see
  # tests/test_cli.py::test_convert_on_a_full_disk_is_one_line_and_exits
  # (checked with orbax-checkpoint 0.12.8, tensorstore 0.1.86).
  _ORBAX = os.sep + "orbax" + os.sep

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.ERROR or self._ORBAX not in record.pathname:
      return True
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, FileNotFoundError):
      # The workdir removed mid-save: Checkpointer reports it in one line,
      # see tests/test_run_record.py::
      # test_workdir_deleted_during_a_save_is_one_line.
      return False
    if error is None:
      error = Exception(record.getMessage())
    return files.write_failure(error) is None


def _is_closed_loop_callback(unraisable) -> bool:
  # By error text: tracebacks after a failed save without it, see
  # tests/test_cli.py::test_failed_saves_print_no_event_loop_tracebacks
  # (checked with orbax-checkpoint 0.12.8, tensorstore 0.1.86).
  return (isinstance(unraisable.exc_value, RuntimeError) and
          str(unraisable.exc_value) == "Event loop is closed")


def quiet_failed_writes() -> None:
  """Keeps a failed write to the one line the main thread reports.

  Orbax logs the error once per background thread, with a traceback
  (_ReportedWriteErrors drops those, on absl's logger, whichever handler
  prints it); then tensorstore completes the failed save's other writes on
  its event loop, closed by then, and each callback reports "Event loop is
  closed" through sys.unraisablehook: dozens of tracebacks that say nothing.
  """
  logger = py_logging.getLogger("absl")
  if not any(isinstance(f, _ReportedWriteErrors) for f in logger.filters):
    logger.addFilter(_ReportedWriteErrors())
  previous = sys.unraisablehook
  if getattr(previous, "_quiet_failed_writes", False):
    return

  def hook(unraisable):
    if not _is_closed_loop_callback(unraisable):
      previous(unraisable)
  hook._quiet_failed_writes = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


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
  quiet_failed_writes()


def _flush() -> None:
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # Closed, or a full disk under a redirect.
      pass
  for handler in py_logging.getLogger().handlers:
    try:
      handler.flush()
    except (OSError, ValueError):
      pass


def _exit_code(code: Any) -> int:
  """The exit status `sys.exit(code)` gives (None: 0, text: printed, 1)."""
  if code is None:
    return 0
  if isinstance(code, int):
    return code & 0xFF
  print(code, file=sys.stderr)
  return 1


def exit_process(code: int) -> NoReturn:
  """Ends the process with `code`.

  Success exits normally: the interpreter waits for every thread, so work
  still in flight finishes. A failure has been reported by now, and waiting
  could be forever: orbax's background threads wait for a save that failed,
  and they are not daemon threads. So the exit handlers (JAX's, which end a
  multi-process run together) run, within EXIT_HANDLERS_TIMEOUT_S, and the
  process ends with os._exit. Noise of objects collected at shutdown, after
  the one-line error, is dropped.
  """
  if code == 0:
    sys.exit(0)
  _flush()
  sys.unraisablehook = lambda unraisable: None
  watchdog = threading.Timer(EXIT_HANDLERS_TIMEOUT_S, os._exit, (code,))
  watchdog.daemon = True
  watchdog.start()
  try:
    atexit._run_exitfuncs()  # pylint: disable=protected-access
  finally:
    _flush()
    os._exit(code)


def run(main: Callable[[list[str]], None]) -> NoReturn:
  """`absl.app.run` with one-line flag errors (exit 2), quiet libraries, and
  an exit that no leftover thread can hold up after a failure."""
  def wrapped(argv):
    setup_logging()
    main(argv)
  try:
    app.run(wrapped, flags_parser=_parse_flags)
  except SystemExit as e:
    exit_process(_exit_code(e.code))
  except KeyboardInterrupt:
    raise  # Python's own exit for SIGINT (status 130 in a shell).
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()  # A bug: its traceback, exit status 1.
    exit_process(1)
  exit_process(0)
