"""The loop's progress: train metrics fetched one logged step late (so the
host never waits for the step it just dispatched), checked finite, logged
with the loop's throughput; and a profile of a few steps once the loop is
warm.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Any
from typing import Iterator
from typing import Mapping

from etils import epath
import jax
import numpy as np

from mnist_resnet.core import files
from mnist_resnet.core.errors import Diverged
from mnist_resnet.workdir import metrics as metrics_lib
from mnist_resnet.workdir import rundir

# A profile starts this many steps after the run (re)starts, or halfway
# through a shorter run: compiling and the first steps are not steady state.
PROFILE_START_AFTER = 10

def check_finite(step: int, metrics: Mapping[str, Any]) -> None:
  """Stops the run at the first step whose loss or gradient is not finite:
  they are computed from the parameters of the step before."""
  if not (np.isfinite(metrics["train_loss"]) and
          np.isfinite(metrics["grad_norm"])):
    raise Diverged(
        f"non-finite train loss or gradient at step {step} "
        f"(loss={metrics['train_loss']}, grad_norm={metrics['grad_norm']})",
        step)


class TrainLog:
  """Train metrics on their way off the device, and the loop's throughput.

  `dispatched(step, metrics)` queues a step's metrics (device arrays). A
  logged step is fetched once the step after it has been dispatched, so the
  host waits for finished work while the device runs the next step;
  `flush(step)` fetches everything up to `step` (before an evaluation or a
  checkpoint). Every fetched step is checked with `check_finite`.
  Throughput leaves out the time spent in `paused()` (evaluation).
  """

  def __init__(self, reporter: metrics_lib.Reporter, *, batch_size: int,
               log_every: int, total_steps: int, start_step: int):
    self._reporter = reporter
    self._batch_size = batch_size
    self._log_every = log_every
    self._total = total_steps
    self._start = start_step
    self._queue: list[tuple[int, dict]] = []
    self.last_train_loss = float("nan")
    self._paused_seconds = 0.0
    self._t_start = time.perf_counter()
    self._t_first: float | None = None  # First step compiled and queued.
    self._last_step = start_step
    # (time, step, paused seconds so far) at the last train log.
    self._window = (self._t_start, start_step, 0.0)

  def dispatched(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    if self._t_first is None:
      self._t_first = time.perf_counter()
    self._last_step = step
    if (step - 1) % self._log_every == 0:
      self.flush(step - 1)
    self._queue.append((step, metrics))
    self._reporter.progress(step)

  def flush(self, upto: int) -> None:
    """Fetches, checks and logs the metrics of every queued step <= upto."""
    ready = [item for item in self._queue if item[0] <= upto]
    if not ready:
      return
    self._queue = self._queue[len(ready):]
    fetched = jax.device_get([m for _, m in ready])
    for (step, _), m in zip(ready, fetched):
      check_finite(step, m)
    step, m = ready[-1][0], fetched[-1]
    self.last_train_loss = float(m["train_loss"])
    if step % self._log_every and step != self._total:
      return
    now = time.perf_counter()
    seconds = now - self._window[0] - (self._paused_seconds - self._window[2])
    rate = (step - self._window[1]) * self._batch_size / max(seconds, 1e-9)
    self._window = (now, step, self._paused_seconds)
    self._reporter.scalars(step, {**m, "images_per_sec": rate})

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._paused_seconds += time.perf_counter() - t0

  def totals(self) -> dict[str, Any]:
    """Training seconds and images/s of the loop so far; call once the last
    step is ready. images/s starts after the first step (compilation)."""
    end = time.perf_counter()
    steps_run = self._last_step - self._start
    timed = (end - self._t_first - self._paused_seconds
             if self._t_first is not None else 0.0)
    return {
        "train_seconds": round(max(end - self._t_start - self._paused_seconds,
                                   0.0), 3),
        "images_per_sec": (round(steps_run * self._batch_size / timed, 2)
                           if timed > 0 else None),
    }


class ProfileWindow:
  """A jax.profiler trace of `num_steps` steps once the loop is warm.

  Starts PROFILE_START_AFTER steps after `start_step` (or halfway through a
  shorter run) and stops after the window, or at the end of the run at the
  latest, so a trace is written whatever the run's length. jax.profiler
  writes local files only: for a remote `directory` (a bucket) the trace goes
  to a local temporary directory, copied there at the stop, then deleted.
  """

  def __init__(self, directory: str | os.PathLike, *, num_steps: int,
               start_step: int, total_steps: int):
    self._directory = epath.Path(directory)
    self._first = (start_step + 1 + min(PROFILE_START_AFTER,
                                        (total_steps - start_step) // 2)
                   if num_steps else -1)
    self._last = min(self._first + num_steps - 1, total_steps)
    self._local: str | None = None  # Where the current trace is written.

  def before_step(self, step: int) -> None:
    if step == self._first:
      if files.is_remote(self._directory):
        self._local = tempfile.mkdtemp(prefix="mnist_resnet_profile_")
      else:
        self._local = os.fspath(self._directory)
      jax.profiler.start_trace(self._local)

  def after_step(self, step: int, state: Any) -> None:
    if self._local is not None and step == self._last:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self._local is None:
      return
    local, self._local = self._local, None
    jax.profiler.stop_trace()
    if files.is_remote(self._directory):
      try:
        _copy_tree(local, self._directory)
      finally:
        shutil.rmtree(local, ignore_errors=True)


def _copy_tree(local: str, remote: epath.Path) -> None:
  for root, _, names in os.walk(local):
    for name in names:
      source = os.path.join(root, name)
      relative = os.path.relpath(source, local)
      with open(source, "rb") as f:
        rundir.write_atomic(remote / relative, f.read())
