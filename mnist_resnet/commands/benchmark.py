"""Throughput benchmarks, one JSON line per measurement on stdout.

    python -m mnist_resnet.benchmark --config=configs/benchmark.py \\
        [--config.mode=step] [--config.batch_sizes=64,128] \\
        [--config.image_sizes=32,64] [--config.profile_dir=DIR]

Runs the modes of `bench_modes.py` over every batch size, image size and
input pipeline asked for; a readable table follows the JSON lines when there
is more than one. Keys, fields and FLOP counts: docs/benchmarking.md.
"""

from __future__ import annotations

import copy
import json
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Sequence

import ml_collections
from ml_collections import config_flags

from mnist_resnet.commands import bench_modes
from mnist_resnet.commands import bench_target
from mnist_resnet.core import cli
from mnist_resnet.core import parallel
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.data import input_pipeline
from mnist_resnet.training import goodput

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Benchmark config file (configs/benchmark.py).",
    lock_config=True)

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


def modes_to_run(mode: str) -> list[str]:
  """The modes config.mode selects ("all": every throughput one, in order;
  "target" trains to a target instead, see bench_target.py)."""
  names = list(bench_modes.MODES)
  if mode == "all":
    return names
  if mode not in [*names, "target"]:
    raise ConfigError(f"config.mode={mode!r}: not one of "
                      f"{', '.join([*names, 'all', 'target'])}")
  return [mode]


def parse_pipelines(text: str, default: str) -> list[str]:
  """'tfdata,device' -> both; '' -> [default] (config.input_pipeline)."""
  text = str(text).strip()
  names = [p.strip() for p in text.split(",")] if text else [default]
  bad = [p for p in names if p not in input_pipeline.PIPELINES]
  if bad:
    raise ConfigError(f"config.input_pipelines={text!r}: {bad[0]!r} is not "
                      f"one of {', '.join(input_pipeline.PIPELINES)}")
  return list(dict.fromkeys(names))


def loop_efficiency(step: Mapping[str, Any],
                    train_result: Mapping[str, Any]) -> dict[str, Any]:
  """The `all` summary: how much of the bare step's speed the loop keeps."""
  return {
      "mode": "all",
      "input_pipeline": train_result["input_pipeline"],
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


def measure_all(config: ml_collections.ConfigDict,
                emit: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
  """Every selected mode for every combination and input pipeline; each
  result goes to `emit` as soon as it is measured, with the versions that
  produced it. The step mode does not
  depend on the pipeline, and the input mode not on the image size, so
  each is measured once per combination that changes it."""
  modes = modes_to_run(config.mode)
  if modes == ["target"]:
    return bench_target.measure_target(config, emit)
  bench_modes.bench_steps(config)
  pipelines = parse_pipelines(config.input_pipelines, config.input_pipeline)
  results = []
  seen_input: set[tuple[int, str]] = set()
  versions = goodput.versions()  # What produced every line.
  for c in combinations(config):
    shared: dict[str, Any] = {}
    step = None
    for name in pipelines:
      c.input_pipeline = name
      by_mode = {}
      for mode in modes:
        if mode == "input":
          if (c.batch_size, name) in seen_input:
            continue
          seen_input.add((c.batch_size, name))
        if mode == "step" and step is not None:
          continue
        by_mode[mode] = {**bench_modes.MODES[mode](c, shared),
                         "versions": versions}
        results.append(by_mode[mode])
        emit(by_mode[mode])
      step = by_mode.get("step", step)
      if config.mode == "all":
        summary = {**loop_efficiency(step, by_mode["train"]),
                   "versions": versions}
        results.append(summary)
        emit(summary)
  return results


_TABLE_COLUMNS = (
    # (heading, key, format)
    ("mode", "mode", "{}"),
    ("input", "input_pipeline", "{}"),
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
  lines = ["  ".join(cell.rjust(w) if i >= 3 else cell.ljust(w)
                     for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
           for row in rows]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config_value(_CONFIG)
  with cli.user_errors():
    # Before anything touches a device (a GPU's deterministic mode).
    parallel.request_deterministic_ops(config.deterministic)
    results = measure_all(config, lambda r: print(json.dumps(r), flush=True))
    if config.mode != "target" and len(combinations(config)) * len(
        parse_pipelines(config.input_pipelines, config.input_pipeline)) > 1:
      print(format_table(results), flush=True)


def run() -> None:
  """The command, as `python -m` runs it."""
  cli.run(main)


if __name__ == "__main__":
  run()
