"""Preemption: stop at a step every process agrees on, after a checkpoint.

Cloud TPU and most schedulers announce a preemption with SIGTERM. In a
multi-process run JAX's coordination service catches it on whichever host
received it, tells every host, and agrees on a step to stop at; orbax's
`reached_preemption(step)` turns true on all hosts at that same step (it must
be asked at every step). A single process has nobody to agree with: a SIGTERM
handler sets a flag that the loop reads after each step.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

import jax


class PreemptionWatcher:
  """`should_stop(step)` is true at the step where the run must save and end."""

  def __init__(self, reached_preemption: Callable[[int], bool]):
    self._multiprocess = jax.process_count() > 1
    self._reached = reached_preemption
    self._flag = threading.Event()
    self._previous = None
    if not self._multiprocess and (
        threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    if self._multiprocess:
      return self._reached(step)
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
