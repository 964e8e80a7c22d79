"""The run directory (workdir): where each of a run's files lives.

    workdir/checkpoints/<step>/   orbax checkpoints (checkpoint.py)
    workdir/metrics.jsonl, events.out.tfevents.*   (reporting.py)
    workdir/profile/              jax.profiler traces
    workdir/results.json          the final record (write_results)
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def profile_dir(workdir: str) -> str:
  return os.path.join(workdir, "profile")


def write_results(workdir: str, results: Mapping[str, Any]) -> str:
  """Writes results.json atomically: readers see the old file or the new."""
  path = os.path.join(workdir, "results.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2, default=str)
  os.replace(tmp, path)
  return path
