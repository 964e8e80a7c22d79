"""Where training metrics go: TensorBoard, metrics.jsonl, and the console.

Only one process writes (process 0 of a multi-host run); the others get a
reporter that logs to the console only. On an interactive terminal a progress
bar shows the step; otherwise (batch jobs, CI) plain log lines do.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Mapping

from absl import logging


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
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._tb = tf.summary.create_file_writer(workdir)
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
