"""`python -m mnist_resnet.inspect_data` as a user runs it (subprocess)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

from mnist_resnet import mnist

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  return subprocess.run(
      [sys.executable, "-m", "mnist_resnet.inspect_data", *args],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_real_mnist_report(mnist_dir):
  result = _run(f"--data_dir={mnist_dir}")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  train, test = report["splits"]["train"], report["splits"]["test"]
  assert train["examples"] == 60000 and test["examples"] == 10000
  assert train["image_shape"] == test["image_shape"] == [28, 28]
  assert sum(train["label_histogram"]) == 60000
  assert sum(test["label_histogram"]) == 10000
  assert len(train["label_histogram"]) == len(test["label_histogram"]) == 10
  assert 30 < train["pixel_mean"] < 37 and 30 < test["pixel_mean"] < 37
  files = report["files"]
  assert set(files) == set(mnist.FILES)
  for name, entry in files.items():
    assert pathlib.Path(entry["path"]).name.startswith(name)
    assert len(entry["md5"]) == 32
    # The training images here are a faithful rebuild, not the official file.
    assert entry["matches_official"] is (name != mnist.TRAIN_IMAGES)


def test_broken_dir_one_line_exit_2(mnist_dir, tmp_path):
  for name in mnist.FILES:
    source = mnist_dir / (name + ".gz")
    if not source.exists():
      source = mnist_dir / name
    shutil.copy(source, tmp_path / source.name)
  broken = tmp_path / (mnist.TEST_IMAGES + ".gz")
  if broken.exists():
    broken.write_bytes(broken.read_bytes()[:100_000])
  else:
    broken = tmp_path / mnist.TEST_IMAGES
    broken.write_bytes(broken.read_bytes()[:100_000])
  result = _run(f"--data_dir={tmp_path}")
  assert result.returncode == 2
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f"error: {broken}")
  assert "Traceback" not in result.stderr


def test_missing_dir_exit_2(tmp_path):
  result = _run(f"--data_dir={tmp_path / 'absent'}")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1
  assert lines[0].startswith("error: missing train-images-idx3-ubyte")
  assert lines[0].endswith("or pass --download")
  assert "Traceback" not in result.stderr
