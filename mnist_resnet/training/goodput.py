"""Time to target accuracy (MLPerf Training's metric) and where a run's time
went (the goodput view): what results.json reports beside the accuracy.

The target clock runs from the first step after compilation to the end of
the first evaluation at or above `target_accuracy`, evaluations and saves
included, compilation (the train step's, ahead of time, and the evaluation
steps' at their first call) left out. Every checkpoint carries the time on
the clock, so a resumed run goes on from there. Details:
docs/training.md#time-to-target.
"""

from __future__ import annotations

import collections
import contextlib
from importlib import metadata
import os
import platform
import time
from typing import Any
from typing import Iterator
from typing import Mapping

import jax

# The checkpoint meta key of `TargetClock.meta()`.
CLOCK = "clock"
# Packages whose versions produced a figure.
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def target_split(validation_examples: int) -> str:
  """The split a target is judged on: the held-out validation split when
  there is one (never tuning on the test set), else the test set."""
  return "validation" if validation_examples > 0 else "test"


class TargetClock:
  """Seconds on the clock, and the step and time the target was reached."""

  def __init__(self, target: float, split: str,
               saved: Mapping[str, Any] | None = None):
    saved = saved or {}
    self.target = target
    self.split = split
    self.reached_step: int | None = saved.get("target_reached_step")
    self.seconds_to_target: float | None = saved.get("seconds_to_target")
    self._carried = float(saved.get("seconds", 0.0))
    self._started: float | None = None
    self._left_out = 0.0

  def start(self) -> None:
    """The first step after compilation starts now."""
    self._started = time.perf_counter()

  def leave_out(self, seconds: float) -> None:
    """`seconds` of compilation inside the loop so far (the evaluation
    steps' first calls) are not on the clock."""
    self._left_out = seconds

  def seconds(self) -> float:
    if self._started is None:
      return self._carried
    return (self._carried + time.perf_counter() - self._started
            - self._left_out)

  def evaluated(self, step: int, eval_results: Mapping[str, Any]) -> bool:
    """Records an evaluation; True when it is the first to reach the
    target."""
    if not self.target or self.reached_step is not None:
      return False
    if eval_results[f"{self.split}_accuracy"] < self.target:
      return False
    self.reached_step = step
    self.seconds_to_target = round(self.seconds(), 3)
    return True

  def meta(self) -> dict[str, Any]:
    """What a checkpoint saves, for `TargetClock(saved=...)` on resume."""
    return {"seconds": round(self.seconds(), 3),
            "target_reached_step": self.reached_step,
            "seconds_to_target": self.seconds_to_target}

  def results(self) -> dict[str, Any]:
    """results.json's fields (all null with no target)."""
    on = bool(self.target)
    return {"target_accuracy": self.target if on else None,
            "target_split": self.split if on else None,
            "target_reached_step": self.reached_step,
            "seconds_to_target": self.seconds_to_target}


class Goodput:
  """Seconds spent in each phase of one invocation, from its start."""

  def __init__(self):
    self._start = time.perf_counter()
    self._seconds: dict[str, float] = collections.defaultdict(float)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self._seconds[name] += time.perf_counter() - start

  def add(self, name: str, seconds: float) -> None:
    self._seconds[name] += seconds

  def seconds(self, name: str) -> float:
    """The seconds spent in phase `name` so far."""
    return self._seconds[name]

  def breakdown(self) -> dict[str, float]:
    """Each phase's seconds; `start_up` for the rest (checks, the lock,
    loading the data, building the program, restoring or initialising the
    state: all that comes before the first step but compilation); and
    `total`, from the start of training (after Python's imports)."""
    total = time.perf_counter() - self._start
    phases = {k: round(v, 3) for k, v in self._seconds.items()}
    rest = total - sum(self._seconds.values())
    return {"start_up": round(rest, 3), **phases, "total": round(total, 3)}


def versions() -> dict[str, Any]:
  """What produced the figures: package versions, Python, the device and
  XLA's flags."""
  found = {}
  for package in _PACKAGES:
    try:
      found[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      found[package] = None
  return {**found, "python": platform.python_version(),
          "platform": jax.devices()[0].platform,
          "device_kind": jax.devices()[0].device_kind,
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
