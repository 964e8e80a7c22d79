"""The benchmark's measurements: each mode is (config, shared) -> one record.

  input: the training input pipeline alone, i.e. the ceiling it puts on
    training throughput: tfdata, shuffled uint8 batches from memory to
    numpy; device, the batch gather on the devices from the dataset there.
  step: the jitted train step alone, the one training compiles, dispatched
    back to back on a device-resident synthetic batch: the most the loop
    could deliver.
  train: the real loop of `train.train_and_evaluate` (config.input_pipeline,
    step,
    metric logging, asynchronous checkpoints at the configured cadence) for
    bench_warmup_steps + bench_steps steps. The final evaluation and
    checkpoint come after the timed steps.

In step and train, a step's time is the gap between the moments its outputs
and the previous step's became ready, seen from a side thread (ReadyClock):
nothing waits in the dispatching thread, so the host prepares step n+1 while
the device runs step n, as in training, and per-step times are still known.
"""

from __future__ import annotations

import copy
import math
import os
import queue
import tempfile
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from mnist_resnet import data
from mnist_resnet import flops
from mnist_resnet import mnist
from mnist_resnet import models
from mnist_resnet import parallel
from mnist_resnet import reporting
from mnist_resnet import train
from mnist_resnet import validation
from mnist_resnet.errors import ConfigError, TrainingError

# Batches pulled before timing: the pipeline's threads, autotuning and
# prefetch buffers settle during these.
INPUT_WARMUP_BATCHES = 50
# Steps captured by a profile (config.profile_dir): enough to see the steady
# state, few enough for a trace that TensorBoard opens quickly.
PROFILE_STEPS = 3


def bench_steps(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(warm-up steps, timed steps) after checking them."""
  warmup, steps = int(config.bench_warmup_steps), int(config.bench_steps)
  if warmup < 1:
    raise ConfigError(f"config.bench_warmup_steps={warmup}: must be >= 1 "
                      "(the first step after compiling pays one-off costs)")
  if steps < 1:
    raise ConfigError(f"config.bench_steps={steps}: must be >= 1")
  return warmup, steps


def benchmark_input(config: ml_collections.ConfigDict,
                    shared: dict[str, Any]) -> dict[str, Any]:
  """Images/s that config.input_pipeline delivers, shuffle on: tfdata to
  numpy on the host, device as sharded batches on the devices.

  Uses config.data_dir, download, batch_size, seed and input_images (images
  timed after the warm-up; rounded up to whole batches).
  """
  del shared
  batch_size = int(config.batch_size)
  wanted = int(config.get("input_images", 200_000))
  validation.validate_config(config)
  if wanted <= 0:
    raise ConfigError(f"config.input_images={wanted}: must be positive")
  train_split = mnist.load_mnist(config.data_dir,
                                 download=config.download)["train"]
  validation.validate_batch_fits(config, len(train_split.labels))
  batches = math.ceil(wanted / batch_size)
  if config.input_pipeline == "device":
    next_batch, bytes_per_example = _device_batches(config, train_split)
  else:
    iterator = data.train_dataset(train_split, global_batch_size=batch_size,
                                  seed=int(config.seed)).as_numpy_iterator()
    next_batch = lambda: next(iterator)
    bytes_per_example = 28 * 28 + 4  # uint8 image, int32 label.
  for _ in range(INPUT_WARMUP_BATCHES):
    jax.block_until_ready(next_batch())
  start = time.perf_counter()
  for _ in range(batches):
    batch = next_batch()
  jax.block_until_ready(batch)
  seconds = time.perf_counter() - start
  assert batch["image"].shape[0] == batch_size
  images = batches * batch_size
  return {
      "mode": "input",
      "input_pipeline": str(config.input_pipeline),
      "batch_size": batch_size,
      "images_per_sec": round(images / seconds, 1),
      "host_to_device_bytes_per_example": bytes_per_example,
      "seconds": round(seconds, 4),
      "images": images,
      "batches": batches,
      "warmup_batches": INPUT_WARMUP_BATCHES,
      "shuffle": True,
  }


def _device_batches(config: ml_collections.ConfigDict, split: mnist.Split
                    ) -> tuple[Callable[[], Any], int]:
  """The device pipeline's batches one after another, as the train step
  gathers them (the step counter stays on the device too), and the bytes
  the host sends per example after start-up: none."""
  mesh = parallel.create_mesh()
  batch_size = int(config.batch_size)
  inputs = data.device_train_inputs(
      data.to_devices(split, mesh), global_batch_size=batch_size,
      seed=int(config.seed), start_step=0, mesh=mesh)

  @jax.jit
  def gather(device_inputs, step):
    batch = data.gather_train_batch(device_inputs, step,
                                    global_batch_size=batch_size, mesh=mesh)
    return batch, step + 1

  step = jax.device_put(np.int32(0), parallel.replicated(mesh))

  def next_batch():
    nonlocal step
    batch, step = gather(next(inputs), step)
    return batch

  return next_batch, 0


def _bytes_per_example(batch: Mapping[str, Any]) -> float:
  """Bytes the host sends to the devices per training example."""
  rows = next(iter(batch.values())).shape[0]
  return sum(v.nbytes for v in batch.values()) / rows


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


def lower_step(program: train.Program, config: ml_collections.ConfigDict
               ) -> jax.stages.Lowered:
  """The program's train step lowered on abstract arguments of the config's
  global batch (nothing is allocated, nothing compiled)."""
  sharding = parallel.batch_sharding(program.mesh)
  batch = {k: jax.ShapeDtypeStruct(parallel.global_shape(v.shape), v.dtype,
                                   sharding=sharding)
           for k, v in synthetic_batch(config).items()}
  return program.train_step.lower(program.abstract_state(), batch)


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


def model_flops(program: train.Program, config: ml_collections.ConfigDict
                ) -> dict[str, Any]:
  """The model's FLOPs per train step, counted from its layers (see
  flops.py): 3 x forward for trained layers, 1 x for a frozen backbone."""
  return flops.model_flops(program.model, int(config.image_size),
                           int(config.batch_size),
                           trained_groups=program.groups)


def _compile_step(program: train.Program, config: ml_collections.ConfigDict
                  ) -> tuple[Any, dict[str, Any]]:
  """Lowers and compiles the program's train step on abstract arguments
  (nothing is allocated); returns the executable, what the compiler says
  about it and the model's own FLOP count."""
  start = time.perf_counter()
  compiled = lower_step(program, config).compile()
  seconds = time.perf_counter() - start
  return compiled, {
      "compile_seconds": round(seconds, 2),
      **model_flops(program, config),
      "flops_per_step_xla": xla_flops_per_step(compiled),
  }


def _peak_memory_bytes() -> int | None:
  """Peak bytes in use on this process's first device, where the backend
  keeps count (GPU, TPU); None on CPU."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])


def _result(mode: str, config: ml_collections.ConfigDict,
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
      "conv_as_dot": models.conv_as_dot_on(config.conv_as_dot,
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
      "peak_memory_bytes": _peak_memory_bytes(),
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


def _step_seconds(ready: Mapping[int, float], warmup: int,
                  steps: int) -> list[float]:
  """Seconds of each timed step: the gaps between consecutive ready times
  of steps warmup..warmup + steps."""
  missing = [s for s in range(warmup, warmup + steps + 1) if s not in ready]
  if missing:
    raise AssertionError(f"steps {missing} were never reported")
  return [ready[s] - ready[s - 1]
          for s in range(warmup + 1, warmup + steps + 1)]


def benchmark_step(config: ml_collections.ConfigDict,
                   shared: dict[str, Any]) -> dict[str, Any]:
  """The train step alone on one device-resident batch, dispatched back to
  back. Keeps the compile figures in `shared` for the train mode."""
  validation.validate_config(config)
  warmup, steps = bench_steps(config)
  bare = copy.deepcopy(config)
  bare.input_pipeline = "tfdata"  # The step on a batch given to it.
  program = train.build_program(bare, mnist.TRAIN_EXAMPLES)
  compiled, info = _compile_step(program, bare)
  shared["compile"] = info
  state = program.initial_state()
  local = synthetic_batch(config)
  batch = jax.block_until_ready(parallel.global_batch(local, program.mesh))
  clock = ReadyClock()
  log_every = max(1, int(config.log_every_steps))
  previous = None
  try:
    for step in range(1, warmup + steps + 1):
      state, metrics = compiled(state, batch)
      clock(step, metrics)
      # The training loop waits for step s - 1 after dispatching step s
      # once every log_every_steps (its metric fetch); so does this one.
      # Unbounded dispatch-ahead ran 4-9% slower on the CPU (most likely
      # as every queued step holds fresh output buffers), a handicap the
      # loop never has.
      if (step - 1) % log_every == 0 and previous is not None:
        previous.block_until_ready()
      previous = metrics["train_loss"]
  finally:
    ready = clock.close()
  times = _step_seconds(ready, warmup, steps)
  loss = float(metrics["train_loss"])
  if not np.isfinite(loss):
    # A config that diverges (a huge learning rate): the user's to fix.
    raise TrainingError(
        f"the benchmarked train step diverged: train loss {loss} after "
        f"{warmup + steps} steps; lower config.learning_rate (now "
        f"{config.learning_rate!r})")
  if config.profile_dir:
    path = os.path.join(str(config.profile_dir), _run_name("step", config))
    # The .xplane.pb is for TensorBoard's profile plugin, the
    # perfetto_trace.json.gz beside it for ui.perfetto.dev.
    with jax.profiler.trace(path, create_perfetto_trace=True):
      for _ in range(PROFILE_STEPS):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
  result = _result("step", bare, times, warmup, info,
                   _bytes_per_example(local))
  del state
  return result


def _run_name(mode: str, config: ml_collections.ConfigDict) -> str:
  name = (f"{mode}_{config.model}_{config.image_size}px_"
          f"b{config.batch_size}_{config.dtype}")
  # Both pipelines' train runs can be profiled side by side.
  if mode == "train" and config.input_pipeline == "device":
    name += "_device"
  return name


def benchmark_train(config: ml_collections.ConfigDict,
                    shared: dict[str, Any]) -> dict[str, Any]:
  """The real training loop for a fixed number of steps.

  Runs `train.train_and_evaluate` in a fresh workdir (a temporary one, or
  under config.profile_dir when profiling) with num_train_steps =
  warm-up + timed steps and evaluation only at the end. With a profile the
  warm-up also covers the steps train.py traces, so the timed steps are
  never traced.
  """
  warmup, steps = bench_steps(config)
  run = copy.deepcopy(config)
  run.eval_every_steps = 0
  if config.profile_dir:
    run.profile_steps = PROFILE_STEPS
    warmup = max(warmup, reporting.PROFILE_START_AFTER + PROFILE_STEPS)
  else:
    run.profile_steps = 0
  run.num_train_steps = warmup + steps
  validation.validate_config(run)
  info = shared.get("compile")
  if info is None:
    # Same program as the step mode's (up to the schedule's constants).
    bare = copy.deepcopy(run)
    bare.input_pipeline = "tfdata"
    _, info = _compile_step(train.build_program(bare, mnist.TRAIN_EXAMPLES),
                            bare)
  clock = ReadyClock()
  with tempfile.TemporaryDirectory(prefix="benchmark_train_") as tmp:
    workdir = tmp
    if config.profile_dir:
      workdir = os.path.join(str(config.profile_dir), _run_name("train", run))
    try:
      train.train_and_evaluate(run, workdir, on_step=clock)
    finally:
      ready = clock.close()
  times = _step_seconds(ready, warmup, steps)
  last = warmup + steps
  sent = (0 if run.input_pipeline == "device"
          else _bytes_per_example(synthetic_batch(run)))
  result = _result("train", run, times, warmup, info, sent)
  result["input_pipeline"] = str(run.input_pipeline)
  result["log_every_steps"] = int(run.log_every_steps)
  result["checkpoint_every_steps"] = int(run.checkpoint_every_steps)
  result["checkpoints_in_timed_steps"] = sum(
      1 for s in range(warmup, last)
      if s % int(run.checkpoint_every_steps) == 0)
  return result


MODES: dict[str, Callable[[ml_collections.ConfigDict, dict[str, Any]],
                          dict[str, Any]]] = {
    "input": benchmark_input,
    "step": benchmark_step,
    "train": benchmark_train,
}
