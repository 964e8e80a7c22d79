"""Trains a config under several sets of overrides and seeds, one JSON line
per run with its test accuracy after every evaluation:

    python tools/recipe_sweep.py --data_dir=data/mnist --out=/tmp/sweep \
        --seeds=0,1 --deadline_seconds=700 \
        base= "wd=--config.weight_decay=0.1" \
        "lr2=--config.learning_rate=24e-3 --config.warmup_steps=600"

Each recipe is NAME=OVERRIDES (train.py flags, space-separated; empty for
the config as it is). Runs go seed by seed (every recipe on the first seed,
then every recipe on the next), so a sweep cut short by its deadline still
has one run of each recipe. A run is skipped when the time left is under
what the slowest run so far took. Every run shares one XLA compilation
cache, so a second seed of a recipe (same program) skips its compile, and
saves one checkpoint, at its end: on a fast accelerator the periodic saves
of a small-batch recipe take a large share of the run.

Meant for an accelerator lent for minutes: the device pipeline, no
download, no TensorFlow needed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

from etils import epath

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from mnist_resnet.workdir import metrics  # pylint: disable=wrong-import-position


def parse_recipe(text: str) -> tuple[str, list[str]]:
  name, sep, overrides = text.partition("=")
  if not sep or not name.isidentifier():
    print(f"error: recipe {text!r}: expected NAME=OVERRIDES with NAME a "
          "plain word", file=sys.stderr)
    sys.exit(2)
  return name, shlex.split(overrides)


def evaluations(workdir: pathlib.Path) -> list[dict]:
  """The run's test evaluations, in step order, from metrics.jsonl (a line
  cut off by the deadline's SIGTERM is skipped)."""
  rows = metrics.read_metrics(epath.Path(workdir) / "metrics.jsonl") or []
  return [{"step": r["step"], "test_accuracy": r["test_accuracy"]}
          for r in rows if "test_accuracy" in r]


def run(args: argparse.Namespace, name: str, overrides: list[str], seed: int,
        seconds: float | None) -> dict:
  workdir = pathlib.Path(args.out) / f"{name}_seed{seed}"
  command = [
      args.python, str(REPO_ROOT / "train.py"), f"--config={args.config}",
      f"--workdir={workdir}", f"--config.data_dir={args.data_dir}",
      "--config.input_pipeline=device", "--config.download=false",
      f"--config.seed={seed}", "--config.checkpoint_every_steps=1000000000",
      f"--config.compilation_cache_dir={pathlib.Path(args.out) / 'xla'}",
      *overrides]
  start = time.monotonic()
  log = workdir.parent / f"{workdir.name}.log"
  with open(log, "w") as stderr:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
      code = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
      # SIGTERM: train.py saves the step it reached, so the run can go on
      # later with the same command.
      proc.terminate()
      proc.wait()
      code = "deadline"
  line = {"recipe": name, "seed": seed, "overrides": " ".join(overrides),
          "seconds": round(time.monotonic() - start, 1), "exit": code,
          "evaluations": evaluations(workdir)}
  results = workdir / "results.json"
  if code == 0 and results.is_file():
    r = json.loads(results.read_text())
    line.update(test_accuracy=r["test_accuracy"],
                train_seconds=r["train_seconds"],
                images_per_sec=r["images_per_sec"])
  else:
    line["log"] = str(log)
  return line


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--config", default=str(REPO_ROOT / "configs" /
                                              "scratch.py"))
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--deadline_seconds", type=float, default=0.0,
                      help="stop starting runs after this; 0: no deadline")
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("recipes", nargs="+", metavar="NAME=OVERRIDES")
  args = parser.parse_args()
  recipes = [parse_recipe(r) for r in args.recipes]
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.out, exist_ok=True)
  start, slowest = time.monotonic(), 0.0
  for seed in seeds:
    for name, overrides in recipes:
      left = (args.deadline_seconds - (time.monotonic() - start)
              if args.deadline_seconds else float("inf"))
      if left < max(slowest, 1.0):
        print(json.dumps({"recipe": name, "seed": seed,
                          "skipped": f"{left:.0f} s left"}), flush=True)
        continue
      line = run(args, name, overrides, seed,
                 seconds=None if left == float("inf") else left)
      slowest = max(slowest, line["seconds"])
      print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()
