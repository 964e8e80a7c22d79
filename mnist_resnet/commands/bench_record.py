"""What one benchmark line holds, and how its step times are taken: the
compiled step's figures (compile time, the model's and XLA's FLOPs), step
times seen from a side thread (`ReadyClock`), images/s, TFLOP/s, MFU and
peak memory."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any
from typing import Mapping
from typing import Sequence

import jax
import ml_collections
import numpy as np

from mnist_resnet.data import mnist
from mnist_resnet.model import flops
from mnist_resnet.model import resnet
from mnist_resnet.training import memory
from mnist_resnet.training import program as program_lib


def synthetic_batch(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """This process's rows of a random batch, exactly as the pipeline yields
  them: uint8 images [B, 28, 28] and int32 labels [B] (resizing and
  normalising happen inside the step, on the device)."""
  rows = int(config.batch_size) // jax.process_count()
  rng = np.random.default_rng(int(config.seed))
  return {
      "image": rng.integers(0, 256, (rows, *mnist.IMAGE_SHAPE),
                            dtype=np.uint8),
      "label": rng.integers(0, mnist.NUM_CLASSES, (rows,), dtype=np.int32),
  }


def lower_step(program: program_lib.Program, config: ml_collections.ConfigDict
               ) -> jax.stages.Lowered:
  """The program's train step lowered on abstract arguments of the config's
  global batch (nothing is allocated, nothing compiled)."""
  del config  # The program holds its batch's shapes.
  return program.lower_train_step()


def xla_flops_per_step(stage: jax.stages.Lowered | jax.stages.Compiled
                       ) -> float | None:
  """XLA's cost analysis of a lowered or compiled train step, all devices;
  None where the backend does not count. Under data parallelism every
  device runs the same program on its slice of the batch, and the analysis
  is of one device's program."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else {}
  count = (cost or {}).get("flops")
  return float(count) * jax.device_count() if count and count > 0 else None


def model_flops(program: program_lib.Program, config: ml_collections.ConfigDict
                ) -> dict[str, Any]:
  """The model's FLOPs per train step, counted from its layers (see
  flops.py): 3 x forward for trained layers, 1 x for a frozen backbone."""
  return flops.model_flops(program.model, int(config.image_size),
                           int(config.batch_size),
                           trained_groups=program.groups)


def compile_step(program: program_lib.Program, config: ml_collections.ConfigDict
                  ) -> tuple[Any, dict[str, Any]]:
  """Lowers and compiles the program's train step on abstract arguments
  (nothing is allocated); returns the executable, what the compiler says
  about it and the model's own FLOP count. memory.OutOfMemory, before
  anything runs, when the step does not fit in memory."""
  start = time.perf_counter()
  compiled = lower_step(program, config).compile()
  seconds = time.perf_counter() - start
  memory.check_fits(compiled, what="the train step", key="batch_size",
                    batch_size=int(config.batch_size))
  return compiled, {
      "compile_seconds": round(seconds, 2),
      **model_flops(program, config),
      "flops_per_step_xla": xla_flops_per_step(compiled),
  }


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on this process's first device, where the backend
  keeps count (GPU, TPU); None on CPU."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])


def result(mode: str, config: ml_collections.ConfigDict,
            step_seconds: Sequence[float], warmup: int,
            compile_info: Mapping[str, Any],
            bytes_per_example: float) -> dict[str, Any]:
  """One JSON record of a step or train measurement."""
  ms = np.asarray(step_seconds, np.float64) * 1e3
  batch = int(config.batch_size)
  devices = jax.device_count()
  seconds = float(np.sum(ms)) / 1e3
  images_per_sec = batch * len(ms) / seconds
  median_s = float(np.median(ms)) / 1e3
  # MFU from the model's own count (flops.py), as MLPerf and MaxText do;
  # XLA's count is reported beside it.
  per_step = compile_info.get("flops_per_step_model")
  tflops = per_step / median_s / 1e12 if per_step else None
  kind = jax.devices()[0].device_kind
  peak = flops.peak_tflops(kind, str(config.dtype))
  mfu = tflops / (peak * devices) if tflops and peak else None
  return {
      "mode": mode,
      "model": str(config.model),
      "image_size": int(config.image_size),
      "dtype": str(config.dtype),
      "batch_size": batch,
      "per_device_batch_size": batch // devices,
      "device_count": devices,
      "process_count": jax.process_count(),
      "device_kind": kind,
      "platform": jax.default_backend(),
      "conv_as_dot": resnet.conv_as_dot_on(config.conv_as_dot,
                                           jax.default_backend()),
      "deterministic": bool(config.deterministic),
      "compile_seconds": compile_info.get("compile_seconds"),
      "step_ms_median": round(float(np.median(ms)), 3),
      "step_ms_p10": round(float(np.percentile(ms, 10)), 3),
      "step_ms_p90": round(float(np.percentile(ms, 90)), 3),
      "step_ms_mean": round(float(np.mean(ms)), 3),
      "step_ms_max": round(float(np.max(ms)), 3),
      "timed_steps": len(ms),
      "warmup_steps": warmup,
      "images_per_sec": round(images_per_sec, 2),
      "images_per_sec_per_device": round(images_per_sec / devices, 2),
      "flops_per_step_model": per_step,
      "flops_per_example_train_model": compile_info.get(
          "flops_per_example_train_model"),
      "flops_per_step_xla": compile_info.get("flops_per_step_xla"),
      "tflops_per_sec": round(tflops, 4) if tflops else None,
      "peak_tflops_per_device": peak,
      "mfu": round(mfu, 4) if mfu else None,
      "peak_memory_bytes": peak_memory_bytes(),
      "host_to_device_bytes_per_example": bytes_per_example,
  }


class ReadyClock:
  """Records when each train step's outputs become ready, off the loop.

  Called with (step, metrics) right after a step is dispatched (by the step
  mode, or as `train_and_evaluate`'s `on_step` hook); a daemon thread waits
  for that step's loss and notes the time. Every output of one execution
  becomes ready at once, so the loss stands for the whole step. Waiting
  there, not in the dispatching thread, keeps the loop exactly as in
  training: the gap between two ready times is a step as the loop delivers
  it, with any stall (input, logging, checkpointing) included.
  """

  def __init__(self):
    self.ready: dict[int, float] = {}
    self._pending: queue.SimpleQueue = queue.SimpleQueue()
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._wait, daemon=True,
                                    name="benchmark-ready-clock")
    self._thread.start()

  def __call__(self, step: int, metrics: Mapping[str, Any]) -> None:
    self._pending.put((step, metrics["train_loss"]))

  def _wait(self) -> None:
    while (item := self._pending.get()) is not None:
      step, value = item
      try:
        value.block_until_ready()
      except BaseException as e:  # pylint: disable=broad-except
        self._error = e
      self.ready[step] = time.perf_counter()

  def close(self) -> dict[int, float]:
    """Waits for every step handed over so far; returns step -> ready time."""
    self._pending.put(None)
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self.ready


def step_seconds(ready: Mapping[int, float], warmup: int,
                  steps: int) -> list[float]:
  """Seconds of each timed step: the gaps between consecutive ready times
  of steps warmup..warmup + steps."""
  missing = [s for s in range(warmup, warmup + steps + 1) if s not in ready]
  if missing:
    raise AssertionError(f"steps {missing} were never reported")
  return [ready[s] - ready[s - 1]
          for s in range(warmup + 1, warmup + steps + 1)]
