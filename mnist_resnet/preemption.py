"""Stopping on signals: SIGTERM (preemption) and SIGINT (Ctrl-C).

`StopSignals` is installed first thing in `train.py`, before anything slow:

  * before the loop (data load, compile, restore) there is nothing to save:
    the handler raises `Interrupted` at once, and the run exits 75 (SIGTERM,
    rerun to continue) or 130 (Ctrl-C);
  * during the loop it only records the signal; the loop reads it after each
    step, so an evaluation or a save in progress completes, then the state is
    saved at the step reached and the run exits 75 or 130. A second Ctrl-C
    exits at once (130); committed checkpoints are atomic and stay intact.

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


class Interrupted(BaseException):
  """A signal before the loop started: nothing to save. A BaseException so
  that no library's `except Exception` swallows it."""

  def __init__(self, signum: int):
    super().__init__(f"{signal.Signals(signum).name} before the first step; "
                     "nothing to save" + (", rerun the same command to start"
                                          if signum == signal.SIGTERM else ""))
    self.signum = signum


class StopSignals:
  """Owns SIGTERM and SIGINT for one run (main thread only)."""

  def __init__(self):
    self._signum: int | None = None
    self._running = False
    self._multiprocess = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._on_signal)

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    if not self._running:
      raise Interrupted(signum)
    if signum == signal.SIGINT and (self._multiprocess or
                                    self._signum == signal.SIGINT):
      print("error: interrupted", file=sys.stderr, flush=True)
      os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access
    if self._signum is None:
      self._signum = signum

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
