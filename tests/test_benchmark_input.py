"""`python -m mnist_resnet.benchmark` in input mode, as a user runs it."""

import json
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  return subprocess.run(
      [sys.executable, "-m", "mnist_resnet.benchmark",
       "--config=configs/benchmark.py", *args],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_input_benchmark_prints_json(mnist_dir):
  result = _run("--config.mode=input", f"--config.data_dir={mnist_dir}",
                "--config.download=false", "--config.input_images=20000",
                "--config.batch_size=128")
  assert result.returncode == 0, result.stderr
  last = json.loads(result.stdout.strip().splitlines()[-1])
  assert last["mode"] == "input"
  assert last["shuffle"] is True
  assert last["batch_size"] == 128
  assert last["images"] >= 20000 and last["images"] % 128 == 0
  assert last["seconds"] > 0
  assert last["images_per_sec"] > 0


def test_missing_data_is_one_line_exit_2(tmp_path):
  result = _run("--config.mode=input", f"--config.data_dir={tmp_path}",
                "--config.download=false")
  assert result.returncode == 2
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: missing train-images-idx3-ubyte")
  assert "Traceback" not in result.stderr


def test_unknown_mode_is_a_config_error(tmp_path):
  result = _run("--config.mode=nonsense", f"--config.data_dir={tmp_path}")
  assert result.returncode == 2
  assert "config.mode='nonsense'" in result.stderr
  assert "Traceback" not in result.stderr
