"""Stopping on signals: SIGTERM (preemption, SIGHUP too) and SIGINT (Ctrl-C).

`StopSignals` is installed first thing in `train.py`, before anything slow.
Before the loop there is nothing to save: a watcher thread, woken through
`signal.set_wakeup_fd`, runs the registered clean-ups and ends the process
with 75 (SIGTERM) or 130 (Ctrl-C). During the loop the signal is only
recorded; the loop saves at the step reached and exits the same way.
Details, and many hosts: docs/operations.md#signals.
Imports only the standard library: it is loaded before JAX.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

from mnist_resnet.core.errors import EXIT_INTERRUPTED
from mnist_resnet.core.errors import exit_code_of_signal


def _write_stderr(line: str) -> None:
  # Unbuffered: the signal may have interrupted a write to sys.stderr, and
  # its buffer refuses a re-entrant one.
  os.write(2, (line + "\n").encode())


def _as_handled(signum: int) -> int:
  """SIGHUP (the terminal or ssh session went away) is handled as SIGTERM."""
  return signal.SIGTERM if signum == signal.SIGHUP else signum


def _stopped_line(signum: int) -> str:
  return (f"stopped: {signal.Signals(signum).name} before the first step; "
          "nothing to save" + ("" if signum == signal.SIGINT else
                               ", rerun the same command to start"))


_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_WAKE_WATCHER = b"\0"  # Not a signal number: tells the watcher to return.


class StopSignals:
  """Owns SIGTERM, SIGINT and SIGHUP for one run (main thread only)."""

  def __init__(self):
    self._signum: int | None = None
    self._running = False
    self._multiprocess = False
    self._previous = {}
    self._cleanups: list[Callable[[], None]] = []
    # Re-entrant: the handler may run in the main thread inside
    # loop_started's critical section.
    self._state = threading.RLock()
    self._wakeup: tuple[int, int] | None = None
    self._previous_wakeup_fd = -1
    if threading.current_thread() is threading.main_thread():
      for signum in _HANDLED:
        if signal.getsignal(signum) is not signal.SIG_IGN:
          self._previous[signum] = signal.signal(signum, self._on_signal)
      if self._previous:
        self._start_watcher()

  def _start_watcher(self) -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # The C-level handler must never block.
    self._previous_wakeup_fd = signal.set_wakeup_fd(
        write_fd, warn_on_full_buffer=False)
    self._wakeup = (read_fd, write_fd)
    threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                     name="stop-signals").start()

  def _watch(self, read_fd: int) -> None:
    while True:
      for signum in os.read(read_fd, 64):
        if signum == _WAKE_WATCHER[0]:
          os.close(read_fd)
          return
        if signum in _HANDLED:
          self._exit_if_before_loop(_as_handled(signum))

  def on_early_exit(self, cleanup: Callable[[], None]) -> None:
    """Runs `cleanup` (bounded) if a signal ends the run before the loop."""
    self._cleanups.append(cleanup)

  def _exit_if_before_loop(self, signum: int) -> None:
    """Ends the process if the loop has not started (from either thread)."""
    with self._state:
      if self._running:
        return
      _write_stderr(_stopped_line(signum))
      self._run_cleanups()
      os._exit(exit_code_of_signal(signum))  # pylint: disable=protected-access

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    signum = _as_handled(signum)
    # Before the loop the watcher has most likely ended the process already;
    # this is the path for when it could not run.
    self._exit_if_before_loop(signum)
    if signum == signal.SIGINT and (self._multiprocess or
                                    self._signum == signal.SIGINT):
      _write_stderr("error: interrupted")
      os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access
    if self._signum is None:
      self._signum = signum

  def _run_cleanups(self, timeout: float = 5.0) -> None:
    # In a daemon thread: the interrupted main thread may hold a lock the
    # clean-up needs, and a hung one must not keep the process alive.
    def run():
      for cleanup in self._cleanups:
        try:
          cleanup()
        except Exception:  # pylint: disable=broad-except
          pass
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)

  def loop_started(self, *, multiprocess: bool) -> None:
    """From now on a signal stops the loop at the next step, after a save."""
    with self._state:
      self._multiprocess = multiprocess
      self._running = True

  def stop_requested(self, step: int,
                     reached_preemption: Callable[[int], bool]) -> int | None:
    """The signal to stop for at this step, or None.

    Multi-process: JAX's preemption sync point (SIGTERM on any host); a
    single process: the signal this process received.
    """
    if self._multiprocess:
      return signal.SIGTERM if reached_preemption(step) else None
    return self._signum

  def received(self) -> int | None:
    """The signal this process recorded during the loop or after it (the
    end-of-run report finishes first), or None."""
    return self._signum

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
    if self._wakeup is not None:
      signal.set_wakeup_fd(self._previous_wakeup_fd)
      _, write_fd = self._wakeup
      os.write(write_fd, _WAKE_WATCHER)  # The watcher closes its end.
      os.close(write_fd)
      self._wakeup = None

  def __enter__(self) -> "StopSignals":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
