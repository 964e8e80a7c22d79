"""Stopping on signals: SIGTERM (preemption) and SIGINT (Ctrl-C).

`StopSignals` is installed first thing in `train.py`, before anything slow:

  * before the loop (imports, data load, compile, restore) there is nothing
    to save: the handler prints one line, runs the registered clean-ups (the
    workdir lock's release) for a few seconds at most, and ends the process
    at once with 75 (SIGTERM, rerun to continue) or 130 (Ctrl-C). It does not
    raise: an exception raised inside whatever code the signal interrupted
    (an import, a garbage-collector callback) can be swallowed or turned into
    another;
  * during the loop it only records the signal; the loop reads it after each
    step, so an evaluation or a save in progress completes, then the state is
    saved at the step reached and the run exits 75 or 130. A second Ctrl-C
    exits at once (130); committed checkpoints are atomic and stay intact.

SIGHUP (the terminal or ssh session went away) counts as SIGTERM. A signal
that was ignored when the process started (`nohup`, background jobs) stays
ignored.

In a multi-process run JAX's coordination service takes SIGTERM on whichever
host received it, tells every host, and agrees on a step to stop at; orbax's
`reached_preemption(step)` turns true on all hosts at that same step (it must
be asked at every step). Ctrl-C there exits at once: one process alone cannot
save a state that every process holds a part of.

Imports only the standard library: it is loaded before JAX.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

from mnist_resnet.errors import EXIT_PREEMPTED

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's code for Ctrl-C.


def exit_code(signum: int) -> int:
  return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


def _stopped_line(signum: int) -> str:
  return (f"stopped: {signal.Signals(signum).name} before the first step; "
          "nothing to save" + ("" if signum == signal.SIGINT else
                               ", rerun the same command to start"))


class StopSignals:
  """Owns SIGTERM and SIGINT for one run (main thread only)."""

  def __init__(self):
    self._signum: int | None = None
    self._running = False
    self._multiprocess = False
    self._previous = {}
    self._cleanups: list[Callable[[], None]] = []
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
          self._previous[signum] = signal.signal(signum, self._on_signal)

  def on_early_exit(self, cleanup: Callable[[], None]) -> None:
    """Runs `cleanup` (bounded) if a signal ends the run before the loop."""
    self._cleanups.append(cleanup)

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGHUP:
      signum = signal.SIGTERM
    if not self._running:
      print(_stopped_line(signum), file=sys.stderr, flush=True)
      self._run_cleanups()
      os._exit(exit_code(signum))  # pylint: disable=protected-access
    if signum == signal.SIGINT and (self._multiprocess or
                                    self._signum == signal.SIGINT):
      print("error: interrupted", file=sys.stderr, flush=True)
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

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def __enter__(self) -> "StopSignals":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
