"""Throughput benchmarks, one JSON line per measurement on stdout.

    python -m mnist_resnet.benchmark --config=configs/benchmark.py \\
        --config.mode=input --config.data_dir=data/mnist

`config.mode` names one entry of MODES, or "all" for every entry in order.
Each mode is a function config -> dict; the dict is printed as one JSON line,
so the last line of stdout is always the latest result and scripts can parse
it without scraping logs. A user error (missing data, bad config value) is one
`error: ...` line on stderr and exit code 2.

Modes:
  input: the training input pipeline alone (shuffled uint8 batches from
    memory to numpy), i.e. the ceiling it puts on training throughput.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

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


def benchmark_input(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Images/s that the training pipeline delivers to numpy, shuffle on.

  Uses config.data_dir, download, batch_size, seed and input_images (images
  timed after the warm-up; rounded up to whole batches).
  """
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
      "images_per_sec": round(images / seconds, 1),
      "batch_size": batch_size,
      "seconds": round(seconds, 4),
      "images": images,
      "batches": batches,
      "warmup_batches": INPUT_WARMUP_BATCHES,
      "shuffle": True,
  }


MODES: dict[str, Callable[[ml_collections.ConfigDict], dict[str, Any]]] = {
    "input": benchmark_input,
}


def modes_to_run(mode: str) -> list[str]:
  """The MODES entries config.mode selects ("all": every one, in order)."""
  if mode == "all":
    return list(MODES)
  if mode not in MODES:
    raise ConfigError(f"config.mode={mode!r}: not one of "
                      f"{', '.join([*MODES, 'all'])}")
  return [mode]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config_value(_CONFIG)
  with cli.user_errors():
    for mode in modes_to_run(config.mode):
      result = MODES[mode](config)
      print(json.dumps(result), flush=True)


if __name__ == "__main__":
  cli.run(main)
