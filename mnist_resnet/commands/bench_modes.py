"""The benchmark's measurements: each mode is (config, shared) -> one record.

input times the training input pipeline alone (tf.data or the on-device
gather), step the jitted train step alone on a device-resident synthetic
batch, train the real loop of `train.train_and_evaluate`. In step and train
a step's time is taken from a side thread (`bench_record.ReadyClock`), so
nothing waits in the dispatching thread. What each mode times and records:
docs/benchmarking.md.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from typing import Any
from typing import Callable
from typing import Mapping

import jax
import ml_collections
import numpy as np

from mnist_resnet.commands import bench_record
from mnist_resnet.core import parallel
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.core.errors import TrainingError
from mnist_resnet.data import input_pipeline
from mnist_resnet.data import mnist
from mnist_resnet.data import source
from mnist_resnet.training import program as program_lib
from mnist_resnet.training import progress
from mnist_resnet.training import train
from mnist_resnet.training import validation

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
  train_split = source.load(config.dataset, config.data_dir,
                            download=config.download).splits["train"]
  validation.validate_batch_fits(config, len(train_split.labels))
  batches = math.ceil(wanted / batch_size)
  if config.input_pipeline == "device":
    next_batch, bytes_per_example = _device_batches(config, train_split)
  else:
    iterator = input_pipeline.train_dataset(
        train_split, global_batch_size=batch_size,
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
  inputs = input_pipeline.device_train_inputs(
      input_pipeline.to_devices(split, mesh), global_batch_size=batch_size,
      seed=int(config.seed), start_step=0, mesh=mesh)

  @jax.jit
  def gather(device_inputs, step):
    batch = input_pipeline.gather_train_batch(device_inputs, step,
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


def benchmark_step(config: ml_collections.ConfigDict,
                   shared: dict[str, Any]) -> dict[str, Any]:
  """The train step alone on one device-resident batch, dispatched back to
  back. Keeps the compile figures in `shared` for the train mode."""
  validation.validate_config(config)
  warmup, steps = bench_steps(config)
  bare = copy.deepcopy(config)
  bare.input_pipeline = "tfdata"  # The step on a batch given to it.
  program = program_lib.build_program(bare, mnist.TRAIN_EXAMPLES)
  compiled, info = bench_record.compile_step(program, bare)
  shared["compile"] = info
  state = program.initial_state()
  local = bench_record.synthetic_batch(config)
  batch = jax.block_until_ready(parallel.global_batch(local, program.mesh))
  clock = bench_record.ReadyClock()
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
  times = bench_record.step_seconds(ready, warmup, steps)
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
  result = bench_record.result("step", bare, times, warmup, info,
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
    warmup = max(warmup, progress.PROFILE_START_AFTER + PROFILE_STEPS)
  else:
    run.profile_steps = 0
  run.num_train_steps = warmup + steps
  validation.validate_config(run)
  info = shared.get("compile")
  if info is None:
    # Same program as the step mode's (up to the schedule's constants).
    bare = copy.deepcopy(run)
    bare.input_pipeline = "tfdata"
    _, info = bench_record.compile_step(
        program_lib.build_program(bare, mnist.TRAIN_EXAMPLES), bare)
  clock = bench_record.ReadyClock()
  with tempfile.TemporaryDirectory(prefix="benchmark_train_") as tmp:
    workdir = tmp
    if config.profile_dir:
      workdir = os.path.join(str(config.profile_dir), _run_name("train", run))
    try:
      results = train.train_and_evaluate(run, workdir, on_step=clock)
    finally:
      ready = clock.close()
  times = bench_record.step_seconds(ready, warmup, steps)
  last = warmup + steps
  sent = (0 if run.input_pipeline == "device"
          else _bytes_per_example(bench_record.synthetic_batch(run)))
  result = bench_record.result("train", run, times, warmup, info, sent)
  result["input_pipeline"] = str(run.input_pipeline)
  result["log_every_steps"] = int(run.log_every_steps)
  result["checkpoint_every_steps"] = int(run.checkpoint_every_steps)
  result["checkpoints_in_timed_steps"] = sum(
      1 for s in range(warmup, last)
      if s % int(run.checkpoint_every_steps) == 0)
  result["checkpoint_blocking_seconds"] = results.get(
      "checkpoint_blocking_seconds")
  return result


MODES: dict[str, Callable[[ml_collections.ConfigDict, dict[str, Any]],
                          dict[str, Any]]] = {
    "input": benchmark_input,
    "step": benchmark_step,
    "train": benchmark_train,
}
