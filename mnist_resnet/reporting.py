"""What the loop tells the world: metrics, throughput and profiles.

`Reporter` writes scalars to TensorBoard, metrics.jsonl and the console. Only
one process writes (process 0 of a multi-host run); the others log to the
console only. On an interactive terminal a progress bar shows the step;
otherwise (batch jobs, CI) plain log lines do.

`TrainLog` takes each step's metrics while they are still on the device and
fetches them one logged step late, so the host never waits for the step it
just dispatched. `ProfileWindow` traces a few steps once the loop is warm.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Iterator, Mapping

from absl import logging
import jax
import numpy as np

from mnist_resnet import tf_host
from mnist_resnet.errors import TrainingError

# A profile starts this many steps after the run (re)starts, or halfway
# through a shorter run: compiling and the first steps are not steady state.
PROFILE_START_AFTER = 10


class Reporter:
  """Writes scalars for one run. Create one per process; only `writes` do."""

  def __init__(self, workdir: str, *, writes: bool, total_steps: int,
               start_step: int):
    self.writes = writes
    self._jsonl = None
    self._tb = None
    self._bar = None
    if writes:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tf = tf_host.import_tensorflow()
      self._tb = self._tf.summary.create_file_writer(workdir)
      if sys.stderr.isatty():
        import tqdm  # pylint: disable=g-import-not-at-top
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step,
                              unit="step", dynamic_ncols=True)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Records one logged step: TensorBoard, one JSON line, one log line."""
    values = {k: float(v) for k, v in values.items()}
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      with self._tb.as_default(step=step):
        for k, v in values.items():
          self._tf.summary.scalar(k, v)
      self._tb.flush()
    text = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    if self._bar is not None:
      self._bar.write(f"step {step}: {text}")
    else:
      logging.info("step %d: %s", step, text)

  def progress(self, step: int) -> None:
    if self._bar is not None:
      self._bar.n = step
      self._bar.refresh()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


def _fmt(v: float) -> str:
  return f"{v:.5g}"


def check_finite(step: int, metrics: Mapping[str, Any]) -> None:
  """Stops the run at the first step whose loss or gradient is not finite."""
  if not (np.isfinite(metrics["train_loss"]) and
          np.isfinite(metrics["grad_norm"])):
    raise TrainingError(
        f"non-finite train loss or gradient at step {step} "
        f"(loss={metrics['train_loss']}, grad_norm={metrics['grad_norm']}); "
        "stopped without saving it, the latest checkpoint is the last good "
        "one")


class TrainLog:
  """Train metrics on their way off the device, and the loop's throughput.

  `dispatched(step, metrics)` queues a step's metrics (device arrays). A
  logged step is fetched once the step after it has been dispatched, so the
  host waits for finished work while the device runs the next step;
  `flush(step)` fetches everything up to `step` (before an evaluation or a
  checkpoint). Every fetched step is checked with `check_finite`.
  Throughput leaves out the time spent in `paused()` (evaluation).
  """

  def __init__(self, reporter: Reporter, *, batch_size: int, log_every: int,
               total_steps: int, start_step: int):
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
  latest, so a trace is written whatever the run's length.
  """

  def __init__(self, directory: str, *, num_steps: int, start_step: int,
               total_steps: int):
    self._directory = directory
    self._first = (start_step + 1 + min(PROFILE_START_AFTER,
                                        (total_steps - start_step) // 2)
                   if num_steps else -1)
    self._last = min(self._first + num_steps - 1, total_steps)
    self._tracing = False

  def before_step(self, step: int) -> None:
    if step == self._first:
      jax.profiler.start_trace(self._directory)
      self._tracing = True

  def after_step(self, step: int, state: Any) -> None:
    if self._tracing and step == self._last:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self._tracing:
      jax.profiler.stop_trace()
      self._tracing = False
