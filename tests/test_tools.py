"""tools/accelerator_checks.sh: it runs where a GPU's minutes are short, so
whatever can go wrong with it is caught here, on the CPU."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

from configs import benchmark as benchmark_config
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "tools" / "accelerator_checks.sh"


def test_accelerator_checks_name_real_configs_and_keys():
  """Every config file and key the script names exists: a renamed key
  fails here, not in a GPU session."""
  text = SCRIPT.read_text()
  keys = set(re.findall(r"--config\.(\w+)=", text))
  known = set(benchmark_config.get_config("gpu").keys())
  assert len(keys) > 10 and keys <= known, keys - known
  files = re.findall(r"configs/\w+\.py", text)
  assert files and all((REPO_ROOT / f).is_file() for f in files), files


def test_accelerator_checks_usage_error():
  proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 2 and proc.stderr.startswith("usage:")


# $PYTHON for a dry run of the script: each train.py and benchmark command
# goes through the real flag parser and config checks, then stands in for
# its run (results.json; the benchmark's JSON lines, with the keys the test
# reads); code given with -c runs as it is.
_DRY_PYTHON = r"""
import json, os, sys
args = sys.argv[1:]
if args[0] == "-c":
  sys.argv = ["-c", *args[2:]]
  exec(args[1])
  sys.exit()
sys.path.insert(0, os.getcwd())
from absl import flags
import jax
from mnist_resnet.model import resnet
from mnist_resnet.training import validation
if args[0] == "train.py":
  import train
  flags.FLAGS(args)
  config = train._CONFIG.value
  validation.validate_config(config)
  os.makedirs(train._WORKDIR.value)
  with open(os.path.join(train._WORKDIR.value, "results.json"), "w") as f:
    json.dump({"step": config.num_train_steps}, f)
  sys.exit()
assert args[:2] == ["-m", "mnist_resnet.benchmark"], args
from mnist_resnet.commands import bench_modes
from mnist_resnet.commands import bench_target
from mnist_resnet.commands import benchmark
flags.FLAGS(args[1:])
config = benchmark._CONFIG.value
if config.mode == "target":
  for seed in bench_target.parse_seeds(config.seeds):
    bench_target.seed_config(config, seed)
    print(json.dumps({"mode": "target", "seed": seed}))
  sys.exit()
bench_modes.bench_steps(config)
for c in benchmark.combinations(config):
  validation.validate_config(c)
  for pipeline in benchmark.parse_pipelines(c.input_pipelines,
                                            c.input_pipeline):
    for mode in benchmark.modes_to_run(c.mode) + (
        ["all"] if c.mode == "all" else []):
      print(json.dumps({
          "mode": mode, "input_pipeline": pipeline,
          "conv_as_dot": resnet.conv_as_dot_on(c.conv_as_dot,
                                               jax.default_backend()),
          "deterministic": bool(c.deterministic)}))
"""


def test_accelerator_checks_quick_mode_runs_every_check(mnist_dir, tmp_path):
  """The whole script in its quick mode on the CPU: one JSON line per
  check, none failed.

  With MNIST_RESNET_SLOW_TOOLS=1 every check runs (about 5 minutes on 2
  cores, 8 with other work beside it: the try before a GPU lease). Without
  it, as in CI, $PYTHON is a dry stand-in: every command line of the script
  still goes through the real flags and config checks, in seconds."""
  python = sys.executable
  if os.environ.get("MNIST_RESNET_SLOW_TOOLS") != "1":
    python = str(tmp_path / "dry_python")
    pathlib.Path(python).write_text(
        f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
        f"{shlex.quote(_DRY_PYTHON)} \"$@\"\n")
    os.chmod(python, 0o755)
  out = tmp_path / "out"
  proc = subprocess.run(
      ["bash", str(SCRIPT), str(mnist_dir), str(out)],
      capture_output=True, text=True, check=False, timeout=900,
      env={**os.environ, "ACCELERATOR_CHECKS_QUICK": "1",
           "JAX_PLATFORMS": "cpu", "PYTHON": python})
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  failed = [l for l in lines if "failed" in l]
  assert not failed, (failed, proc.stdout[-3000:])
  checks = {l.get("check") for l in lines}
  assert {"devices", "smoke", "deterministic_repeat", "scratch",
          "scratch_10_epochs"} <= checks, checks
  assert [l["seed"] for l in lines if l.get("mode") == "target"] == [0, 1]
  repeat = next(l for l in lines if l.get("check") == "deterministic_repeat")
  assert len(repeat["params_sha256"]) == 2
  assert sum(l.get("mode") == "all" for l in lines) == 2, proc.stdout
  # The two step-mode variants say what they varied.
  steps = [l for l in lines if l.get("mode") == "step"]
  assert [(l["conv_as_dot"], l["deterministic"]) for l in steps[-2:]] == [
      (False, False), (True, True)], steps
  assert (out / "logs.tgz").is_file()


SWEEP = REPO_ROOT / "tools" / "recipe_sweep.py"


def test_recipe_sweep_bad_recipe_is_one_line_exit_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(SWEEP), "--data_dir=x", f"--out={tmp_path}",
       "no name=--config.seed=1"], capture_output=True, text=True,
      check=False)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
      "error: recipe 'no name=--config.seed=1': expected NAME=OVERRIDES "
      "with NAME a plain word"]


def test_recipe_sweep_reads_every_evaluation_in_step_order(tmp_path):
  sys.path.insert(0, str(SWEEP.parent))
  try:
    import recipe_sweep  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
      {"step": 50, "train_loss": 1.0},
      {"step": 937, "test_accuracy": 0.99, "test_loss": 0.1},
      {"step": 1874, "test_accuracy": 0.995, "test_loss": 0.09}]) + "\n")
  assert recipe_sweep.evaluations(tmp_path) == [
      {"step": 937, "test_accuracy": 0.99},
      {"step": 1874, "test_accuracy": 0.995}]
  assert recipe_sweep.evaluations(tmp_path / "absent") == []
  assert recipe_sweep.parse_recipe("base=") == ("base", [])
  assert recipe_sweep.parse_recipe(
      "wd=--config.weight_decay=0.1 --config.seed=2") == (
          "wd", ["--config.weight_decay=0.1", "--config.seed=2"])
