"""`python -m mnist_resnet.inspect_data` as a user runs it (subprocess)."""

import gzip
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mnist_resnet.data import idx
from mnist_resnet.data import mnist

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  return subprocess.run(
      [sys.executable, "-m", "mnist_resnet.inspect_data", *args],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


# md5 of the official MNIST files' uncompressed content.
OFFICIAL_CONTENT_MD5 = {
    mnist.TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    mnist.TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    mnist.TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    mnist.TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}
# The shared training images: a rebuild (see the data's README).
REBUILT_TRAIN_IMAGES_CONTENT_MD5 = "ff31079e9f752de13a2ec1d4a52d8877"
TRAIN_HISTOGRAM = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_HISTOGRAM = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
# Mean pixel values, computed once with numpy from the files (the rebuild's
# is slightly off the official file's).
TEST_PIXEL_MEAN = 33.7912
TRAIN_PIXEL_MEAN = {"official": 33.3184, "rebuilt": 33.3314}


def _md5s(path: pathlib.Path) -> tuple[str, str]:
  """md5 of the file and of its uncompressed content."""
  data = path.read_bytes()
  content = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
  return hashlib.md5(data).hexdigest(), hashlib.md5(content).hexdigest()


def test_real_mnist_report(mnist_dir):
  result = _run(f"--data_dir={mnist_dir}")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  files = report["files"]
  assert set(files) == set(mnist.FILES)
  content = {}
  for name, entry in files.items():
    path = pathlib.Path(entry["path"])
    assert path.parent == mnist_dir and path.name in (name, name + ".gz")
    md5, content[name] = _md5s(path)
    assert entry["md5"] == md5
  # Every file is official except, possibly, the known rebuild of the
  # training images; the report says exactly that.
  rebuilt = content[mnist.TRAIN_IMAGES] == REBUILT_TRAIN_IMAGES_CONTENT_MD5
  assert content == {**OFFICIAL_CONTENT_MD5, **(
      {mnist.TRAIN_IMAGES: REBUILT_TRAIN_IMAGES_CONTENT_MD5} if rebuilt
      else {})}
  assert {name: e["matches_official"] for name, e in files.items()} == {
      name: not (rebuilt and name == mnist.TRAIN_IMAGES)
      for name in mnist.FILES}

  train, test = report["splits"]["train"], report["splits"]["test"]
  assert train["examples"] == 60000 and test["examples"] == 10000
  assert train["image_shape"] == test["image_shape"] == [28, 28]
  assert train["label_histogram"] == TRAIN_HISTOGRAM
  assert test["label_histogram"] == TEST_HISTOGRAM
  assert abs(test["pixel_mean"] - TEST_PIXEL_MEAN) < 5e-4
  expected = TRAIN_PIXEL_MEAN["rebuilt" if rebuilt else "official"]
  assert abs(train["pixel_mean"] - expected) < 5e-4


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


@pytest.mark.parametrize("empty", ["train", "test"])
def test_empty_split_is_one_line_exit_2(tmp_path, empty):
  """Valid idx files with 0 images: training refuses them, so the check
  before a long run does too (its mean pixel would be NaN, not JSON)."""
  for split, (images, labels) in mnist.SPLIT_FILES.items():
    n = 0 if split == empty else 10
    idx.write_idx(tmp_path / images, np.zeros((n, 28, 28), np.uint8))
    idx.write_idx(tmp_path / labels, np.zeros(n, np.uint8))
  result = _run(f"--data_dir={tmp_path}")
  assert result.returncode == 2
  assert result.stdout == ""
  images = mnist.SPLIT_FILES[empty][0]
  assert result.stderr == (f"error: {tmp_path / images}: the {empty} split "
                           "holds 0 images\n")
