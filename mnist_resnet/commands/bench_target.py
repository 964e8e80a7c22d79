"""The benchmark's `target` mode: time to accuracy over several seeds.

Trains the config's recipe once per seed of `config.seeds`, each stopping at
`target_accuracy` (`stop_at_target`), in a fresh workdir: one JSON line per
seed, then one with the median and range of `seconds_to_target`, images/s
and compile seconds, so a README figure comes from one command. The clock
and the split it is judged on: docs/training.md#time-to-target.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Sequence

import jax
import ml_collections

from mnist_resnet.core.errors import ConfigError
from mnist_resnet.training import goodput
from mnist_resnet.training import train
from mnist_resnet.training import validation


def parse_seeds(text: str) -> list[int]:
  """'0,1' -> [0, 1]; at least one, each a non-negative integer."""
  try:
    seeds = [int(s) for s in str(text).split(",") if s.strip()]
  except ValueError:
    seeds = []
  if not seeds or any(s < 0 for s in seeds):
    raise ConfigError(f"config.seeds={text!r}: must be comma-separated "
                      "non-negative integers, e.g. 0,1")
  return list(dict.fromkeys(seeds))


def seed_config(config: ml_collections.ConfigDict, seed: int
                ) -> ml_collections.ConfigDict:
  """The recipe for one seed, stopping at its target; checked."""
  if not config.target_accuracy > 0:
    raise ConfigError(f"config.target_accuracy={config.target_accuracy!r}: "
                      "the target mode needs a target, e.g. 0.99")
  run = copy.deepcopy(config)
  run.seed = seed
  run.stop_at_target = True
  run.profile_steps = 0
  validation.validate_config(run)
  return run


def seed_record(run: ml_collections.ConfigDict,
                results: Mapping[str, Any]) -> dict[str, Any]:
  """One seed's line: its time to target and what it cost."""
  spent = results["time"]
  return {
      "mode": "target",
      "seed": int(run.seed),
      "model": str(run.model),
      "image_size": int(run.image_size),
      "dtype": str(run.dtype),
      "batch_size": int(run.batch_size),
      "input_pipeline": str(run.input_pipeline),
      **{k: results[k] for k in ("target_accuracy", "target_split",
                                 "target_reached_step", "seconds_to_target",
                                 "step", "test_accuracy", "images_per_sec")},
      "compile_seconds": round(spent.get("compilation", 0.0)
                               + spent.get("evaluation_compilation", 0.0), 3),
      "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(),
      "time": spent,
  }


def _spread(values: Sequence[float | None]) -> dict[str, float | None]:
  known = [v for v in values if v is not None]
  if not known:
    return {"median": None, "min": None, "max": None}
  return {"median": round(statistics.median(known), 3),
          "min": round(min(known), 3), "max": round(max(known), 3)}


def summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The median and range over the seeds (those that reached the target,
  for the time to it)."""
  first = records[0]
  out = {"mode": "target_summary",
         "seeds": [r["seed"] for r in records],
         "reached": sum(r["target_reached_step"] is not None
                        for r in records),
         **{k: first[k] for k in ("model", "image_size", "dtype",
                                  "batch_size", "input_pipeline",
                                  "target_accuracy", "target_split",
                                  "device_kind", "device_count")}}
  for key in ("seconds_to_target", "images_per_sec", "compile_seconds"):
    for stat, value in _spread([r[key] for r in records]).items():
      out[f"{key}_{stat}"] = value
  return out


def measure_target(config: ml_collections.ConfigDict,
                   emit: Callable[[dict[str, Any]], None]
                   ) -> list[dict[str, Any]]:
  """Every seed's line as it ends, then the summary; all checked first."""
  runs = [seed_config(config, s) for s in parse_seeds(config.seeds)]
  versions = goodput.versions()
  records = []
  for run in runs:
    with tempfile.TemporaryDirectory(prefix="benchmark_target_") as workdir:
      results = train.train_and_evaluate(run, workdir)
    records.append({**seed_record(run, results), "versions": versions})
    emit(records[-1])
  records.append({**summary(records), "versions": versions})
  emit(records[-1])
  return records
