"""tools/accelerator_checks.sh: it runs where a GPU's minutes are short, so
whatever can go wrong with it is caught here, on the CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

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


@pytest.mark.skipif(os.environ.get("MNIST_RESNET_SLOW_TOOLS") != "1",
                    reason="about 5 minutes; set MNIST_RESNET_SLOW_TOOLS=1")
def test_accelerator_checks_quick_mode_runs_every_check(mnist_dir, tmp_path):
  """The whole script in its quick mode on the CPU: one JSON line per
  check, none failed."""
  proc = subprocess.run(
      ["bash", str(SCRIPT), str(mnist_dir), str(tmp_path)],
      capture_output=True, text=True, check=False, timeout=900,
      env={**os.environ, "ACCELERATOR_CHECKS_QUICK": "1",
           "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable})
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  failed = [l for l in lines if "failed" in l]
  assert not failed, (failed, proc.stdout[-3000:])
  checks = {l.get("check") for l in lines}
  assert {"devices", "smoke", "scratch", "scratch_10_epochs"} <= checks, checks
  assert sum(l.get("mode") == "all" for l in lines) == 2, proc.stdout
  # The two step-mode variants say what they varied.
  steps = [l for l in lines if l.get("mode") == "step"]
  assert [(l["conv_as_dot"], l["deterministic"]) for l in steps[-2:]] == [
      (False, False), (True, True)], steps
  assert (tmp_path / "logs.tgz").is_file()


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
