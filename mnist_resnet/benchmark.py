"""Throughput benchmarks, one JSON line per measurement on stdout.

    python -m mnist_resnet.benchmark --config=configs/benchmark.py \\
        [--config.mode=step] [--config.batch_sizes=64,128] \\
        [--config.image_sizes=32,64] [--config.profile_dir=DIR]

`config.mode` names one entry of MODES, or "all" for every entry in order
followed by a `loop_efficiency` line. Each mode is a function
(config, shared) -> dict; the dict is printed as one JSON line.

Modes:
  input: the training input pipeline alone (shuffled uint8 batches from
    memory to numpy), i.e. the ceiling it puts on training throughput.
  step: the jitted train step alone, the Trainer's own (so exactly the step
    training runs), dispatched back to back on a device-resident synthetic
    batch: the most the loop could deliver.
  train: the real loop of `train.train_and_evaluate` (input pipeline, step,
    metric logging, asynchronous checkpoints at the configured cadence) for
    bench_warmup_steps + bench_steps steps. The final evaluation and
    checkpoint come after the timed steps.

In both, a step's time is the gap between the moments its outputs and the
previous step's became ready, seen from a side thread (ReadyClock): nothing
waits in the dispatching thread, so the host prepares step n+1 while the
device runs step n, as in training, and per-step times are still known.
  all: input, step and train, then {"mode": "all", "loop_efficiency": ...}
    with loop_efficiency = train images/s / step images/s (1.0: the loop
    adds nothing to the step).

Sweeps: config.batch_sizes and config.image_sizes (comma-separated) measure
every combination; after more than one combination a readable table
follows the JSON lines. Every JSON line starts with "{", so a script can
keep those lines and skip the table. A user error (missing data, bad config
value) is one `error: ...` line on stderr and exit code 2.

`images_per_sec` is timed images over timed seconds (every stall counts);
`step_ms_median` and its p10/p90 describe the per-step distribution
(`batch_size / step_ms_median` is the median-based rate that the peer
scripts in the project's bench directory report).
"""

from __future__ import annotations

import copy
import json
import math
import os
import queue
import tempfile
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from ml_collections import config_flags
import ml_collections

from mnist_resnet import cli
from mnist_resnet import data
from mnist_resnet.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Benchmark config file (configs/benchmark.py).",
    lock_config=True)

# Batches pulled before timing: the pipeline's threads, autotuning and
# prefetch buffers settle during these.
INPUT_WARMUP_BATCHES = 50
# Steps captured by a profile (config.profile_dir): enough to see the steady
# state, few enough for a trace that TensorBoard opens quickly.
PROFILE_STEPS = 3
# train.py starts its profile this many steps after the run (re)starts.
TRAIN_PROFILE_START = 10
# The size of MNIST's training split: the step's schedule is built for it.
NUM_TRAIN_EXAMPLES = 60_000

# Dense peak TFLOP/s of one chip, (bfloat16, float32), for `mfu`. float32 on
# NVIDIA is the TF32 tensor-core rate: XLA's default precision for float32
# convolutions and matmuls uses TF32 on Ampere and later. On TPU float32
# matmuls run as single bfloat16 passes by default, so both columns are the
# bfloat16 rate. Matched in order against the lower-cased device kind, so
# specific names come before the names they contain.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("h100 pcie", 756.0, 378.0),
    ("h100", 989.0, 495.0),
    ("h200", 989.0, 495.0),
    ("a100", 312.0, 156.0),
    ("tpu v4", 275.0, 275.0),
    ("tpu v5 lite", 197.0, 197.0),
    ("tpu v5e", 197.0, 197.0),
    ("tpu v5p", 459.0, 459.0),
    ("tpu v5", 459.0, 459.0),
    ("tpu v6 lite", 918.0, 918.0),
    ("tpu v6e", 918.0, 918.0),
    ("tpu7x", 2307.0, 2307.0),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The chip's dense peak for `dtype`, or None when it is not in the table
  (every CPU, and accelerators the table does not list)."""
  kind = device_kind.lower()
  for name, bf16, f32 in PEAK_TFLOPS:
    if name in kind:
      return bf16 if dtype == "bfloat16" else f32
  return None


def parse_sizes(text: str, default: int, key: str) -> list[int]:
  """'64,128' -> [64, 128]; '' -> [default]."""
  text = str(text).strip()
  if not text:
    return [int(default)]
  try:
    values = [int(v) for v in text.split(",")]
  except ValueError:
    raise ConfigError(f"config.{key}={text!r}: must be comma-separated "
                      "integers, e.g. 64,128") from None
  if any(v <= 0 for v in values):
    raise ConfigError(f"config.{key}={text!r}: every value must be positive")
  return list(dict.fromkeys(values))


def _bench_steps(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(warm-up steps, timed steps) after checking them."""
  warmup, steps = int(config.bench_warmup_steps), int(config.bench_steps)
  if warmup < 1:
    raise ConfigError(f"config.bench_warmup_steps={warmup}: must be >= 1 "
                      "(the first step after compiling pays one-off costs)")
  if steps < 1:
    raise ConfigError(f"config.bench_steps={steps}: must be >= 1")
  return warmup, steps


# --------------------------------------------------------------------------
# input


def benchmark_input(config: ml_collections.ConfigDict,
                    shared: dict[str, Any]) -> dict[str, Any]:
  """Images/s that the training pipeline delivers to numpy, shuffle on.

  Uses config.data_dir, download, batch_size, seed and input_images (images
  timed after the warm-up; rounded up to whole batches).
  """
  del shared
  batch_size = int(config.batch_size)
  wanted = int(config.get("input_images", 200_000))
  if batch_size <= 0:
    raise ConfigError(f"config.batch_size={batch_size}: must be positive")
  if wanted <= 0:
    raise ConfigError(f"config.input_images={wanted}: must be positive")
  train = data.load_mnist(config.data_dir, download=config.download)["train"]
  if batch_size > len(train.labels):
    raise ConfigError(f"config.batch_size={batch_size}: larger than the "
                      f"{len(train.labels)} training images")
  batches = math.ceil(wanted / batch_size)
  ds = data.train_dataset(train, global_batch_size=batch_size,
                          seed=int(config.seed))
  iterator = ds.as_numpy_iterator()
  for _ in range(INPUT_WARMUP_BATCHES):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  assert batch["image"].shape[0] == batch_size
  images = batches * batch_size
  return {
      "mode": "input",
      "batch_size": batch_size,
      "images_per_sec": round(images / seconds, 1),
      "host_to_device_bytes_per_example": _bytes_per_example(batch),
      "seconds": round(seconds, 4),
      "images": images,
      "batches": batches,
      "warmup_batches": INPUT_WARMUP_BATCHES,
      "shuffle": True,
  }


# --------------------------------------------------------------------------
# step and train: what both measure and report


def _bytes_per_example(batch: Mapping[str, Any]) -> float:
  """Bytes the host sends to the devices per training example."""
  rows = next(iter(batch.values())).shape[0]
  return sum(v.nbytes for v in batch.values()) / rows


def synthetic_batch(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """This process's rows of a random batch, exactly as the pipeline yields
  them: uint8 images [B, 28, 28] and int32 labels [B] (resizing and
  normalising happen inside the step, on the device)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rows = int(config.batch_size) // jax.process_count()
  rng = np.random.default_rng(int(config.seed))
  return {
      "image": rng.integers(0, 256, (rows, 28, 28), dtype=np.uint8),
      "label": rng.integers(0, 10, (rows,), dtype=np.int32),
  }


def _compile_step(trainer: Any, config: ml_collections.ConfigDict
                  ) -> tuple[Any, dict[str, Any]]:
  """Lowers and compiles the Trainer's train step on abstract arguments
  (nothing is allocated); returns the executable and what the compiler
  says about it."""
  import jax  # pylint: disable=g-import-not-at-top
  from mnist_resnet import parallel  # pylint: disable=g-import-not-at-top
  sharding = parallel.batch_sharding(trainer.mesh)
  batch = {k: jax.ShapeDtypeStruct(
      (v.shape[0] * jax.process_count(),) + v.shape[1:], v.dtype,
      sharding=sharding) for k, v in synthetic_batch(config).items()}
  start = time.perf_counter()
  compiled = trainer.train_step.lower(trainer.abstract_state(),
                                      batch).compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else {}
  # The cost of one device's program; under data parallelism every device
  # runs the same program on its slice of the batch.
  flops = (cost or {}).get("flops")
  return compiled, {
      "compile_seconds": round(seconds, 2),
      "flops_per_step": (float(flops) * jax.device_count()
                         if flops and flops > 0 else None),
  }


def _peak_memory_bytes() -> int | None:
  """Peak bytes in use on this process's first device, where the backend
  keeps count (GPU, TPU); None on CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])


def _result(mode: str, config: ml_collections.ConfigDict,
            step_seconds: Sequence[float], warmup: int,
            compile_info: Mapping[str, Any],
            bytes_per_example: float) -> dict[str, Any]:
  """One JSON record of a step or train measurement."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  ms = np.asarray(step_seconds, np.float64) * 1e3
  batch = int(config.batch_size)
  devices = jax.device_count()
  seconds = float(np.sum(ms)) / 1e3
  images_per_sec = batch * len(ms) / seconds
  median_s = float(np.median(ms)) / 1e3
  flops = compile_info.get("flops_per_step")
  tflops = flops / median_s / 1e12 if flops else None
  kind = jax.devices()[0].device_kind
  peak = peak_tflops(kind, str(config.dtype))
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
      "flops_per_step": flops,
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


# --------------------------------------------------------------------------
# step


def benchmark_step(config: ml_collections.ConfigDict,
                   shared: dict[str, Any]) -> dict[str, Any]:
  """The train step alone on one device-resident batch, dispatched back to
  back. Keeps the compile figures in `shared` for the train mode."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mnist_resnet import parallel  # pylint: disable=g-import-not-at-top
  from mnist_resnet import train  # pylint: disable=g-import-not-at-top
  train.validate_config(config)
  warmup, steps = _bench_steps(config)
  trainer = train.Trainer.create(config, NUM_TRAIN_EXAMPLES)
  compiled, info = _compile_step(trainer, config)
  shared["compile"] = info
  state = trainer.initial_state()
  local = synthetic_batch(config)
  batch = jax.block_until_ready(parallel.global_batch(local, trainer.mesh))
  clock = ReadyClock()
  try:
    for step in range(1, warmup + steps + 1):
      state, metrics = compiled(state, batch)
      clock(step, metrics)
  finally:
    ready = clock.close()
  times = _step_seconds(ready, warmup, steps)
  if not np.isfinite(float(metrics["train_loss"])):
    raise AssertionError("the benchmarked step produced a non-finite loss")
  if config.profile_dir:
    path = os.path.join(str(config.profile_dir), _run_name("step", config))
    # The .xplane.pb is for TensorBoard's profile plugin, the
    # perfetto_trace.json.gz beside it for ui.perfetto.dev.
    with jax.profiler.trace(path, create_perfetto_trace=True):
      for _ in range(PROFILE_STEPS):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
  result = _result("step", config, times, warmup, info,
                   _bytes_per_example(local))
  del state
  return result


def _run_name(mode: str, config: ml_collections.ConfigDict) -> str:
  return (f"{mode}_{config.model}_{config.image_size}px_"
          f"b{config.batch_size}_{config.dtype}")


# --------------------------------------------------------------------------
# train


def benchmark_train(config: ml_collections.ConfigDict,
                    shared: dict[str, Any]) -> dict[str, Any]:
  """The real training loop for a fixed number of steps.

  Runs `train.train_and_evaluate` in a fresh workdir (a temporary one, or
  under config.profile_dir when profiling) with num_train_steps =
  warm-up + timed steps and evaluation only at the end. With a profile the
  warm-up also covers the steps train.py traces, so the timed steps are
  never traced.
  """
  from mnist_resnet import train  # pylint: disable=g-import-not-at-top
  warmup, steps = _bench_steps(config)
  run = copy.deepcopy(config)
  run.eval_every_steps = 0
  if config.profile_dir:
    run.profile_steps = PROFILE_STEPS
    warmup = max(warmup, TRAIN_PROFILE_START + PROFILE_STEPS)
  else:
    run.profile_steps = 0
  run.num_train_steps = warmup + steps
  train.validate_config(run)
  info = shared.get("compile")
  if info is None:
    # Same program as the step mode's (up to the schedule's constants).
    trainer = train.Trainer.create(run, NUM_TRAIN_EXAMPLES)
    _, info = _compile_step(trainer, run)
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
  result = _result("train", run, times, warmup, info,
                   _bytes_per_example(synthetic_batch(run)))
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


def modes_to_run(mode: str) -> list[str]:
  """The MODES entries config.mode selects ("all": every one, in order)."""
  if mode == "all":
    return list(MODES)
  if mode not in MODES:
    raise ConfigError(f"config.mode={mode!r}: not one of "
                      f"{', '.join([*MODES, 'all'])}")
  return [mode]


def loop_efficiency(step: Mapping[str, Any],
                    train_result: Mapping[str, Any]) -> dict[str, Any]:
  """The `all` summary: how much of the bare step's speed the loop keeps."""
  return {
      "mode": "all",
      "model": step["model"],
      "image_size": step["image_size"],
      "dtype": step["dtype"],
      "batch_size": step["batch_size"],
      "step_images_per_sec": step["images_per_sec"],
      "train_images_per_sec": train_result["images_per_sec"],
      "loop_efficiency": round(
          train_result["images_per_sec"] / step["images_per_sec"], 4),
  }


# --------------------------------------------------------------------------
# Sweeps and output


def combinations(config: ml_collections.ConfigDict
                 ) -> list[ml_collections.ConfigDict]:
  """One config per (batch size, image size) of the sweep, in that order."""
  batches = parse_sizes(config.batch_sizes, config.batch_size, "batch_sizes")
  sizes = parse_sizes(config.image_sizes, config.image_size, "image_sizes")
  out = []
  for batch in batches:
    for size in sizes:
      c = copy.deepcopy(config)
      c.batch_size = batch
      c.image_size = size
      out.append(c)
  return out


def run(config: ml_collections.ConfigDict,
        emit: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
  """Every selected mode for every combination; each result goes to `emit`
  as soon as it is measured. The input pipeline does not depend on the
  image size, so it is measured once per batch size."""
  modes = modes_to_run(config.mode)
  _bench_steps(config)
  results = []
  seen_input: set[int] = set()
  for c in combinations(config):
    shared: dict[str, Any] = {}
    by_mode = {}
    for mode in modes:
      if mode == "input":
        if c.batch_size in seen_input:
          continue
        seen_input.add(c.batch_size)
      by_mode[mode] = MODES[mode](c, shared)
      results.append(by_mode[mode])
      emit(by_mode[mode])
    if config.mode == "all":
      summary = loop_efficiency(by_mode["step"], by_mode["train"])
      results.append(summary)
      emit(summary)
  return results


_TABLE_COLUMNS = (
    # (heading, key, format)
    ("mode", "mode", "{}"),
    ("model", "model", "{}"),
    ("size", "image_size", "{}"),
    ("batch", "batch_size", "{}"),
    ("/device", "per_device_batch_size", "{}"),
    ("dtype", "dtype", "{}"),
    ("ms p50", "step_ms_median", "{:.1f}"),
    ("ms p10", "step_ms_p10", "{:.1f}"),
    ("ms p90", "step_ms_p90", "{:.1f}"),
    ("images/s", "images_per_sec", "{:.1f}"),
    ("TFLOP/s", "tflops_per_sec", "{:.3f}"),
    ("mfu", "mfu", "{:.3f}"),
    ("compile s", "compile_seconds", "{:.1f}"),
    ("loop eff", "loop_efficiency", "{:.3f}"),
)


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
  """The results as an aligned text table, one row per JSON line."""
  rows = [[h for h, _, _ in _TABLE_COLUMNS]]
  for r in results:
    rows.append([fmt.format(r[key]) if r.get(key) is not None else "-"
                 for _, key, fmt in _TABLE_COLUMNS])
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w)
                     for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
           for row in rows]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config_value(_CONFIG)
  with cli.user_errors():
    results = run(config, lambda r: print(json.dumps(r), flush=True))
    if len(combinations(config)) > 1:
      print(format_table(results), flush=True)


if __name__ == "__main__":
  cli.run(main)
