"""Config validation: every shipped config passes, every bad value is named."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

from conftest import REPO_ROOT
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.training import validation

# Every training config in configs/ (benchmark.py adds the benchmark's keys
# to one of them, below).
SHIPPED = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "benchmark"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_pass_validation(name):
  validation.validate_config(
      importlib.import_module(f"configs.{name}").get_config())


def test_every_shipped_config_is_checked():
  assert {"default", "scratch", "smoke", "gpu", "tpu", "large_batch"} <= set(
      SHIPPED)


@pytest.mark.parametrize("base", ["", "gpu", "tpu", "scratch", "large_batch"])
def test_benchmark_configs_pass_validation(base):
  from configs import benchmark
  validation.validate_config(benchmark.get_config(base))


def _smoke(**overrides):
  from configs import smoke
  c = smoke.get_config()
  for key, value in overrides.items():
    c[key] = value
  return c


@pytest.mark.parametrize("overrides, message", [
    ({"target_accuracy": 1.5},
     "config.target_accuracy=1.5: must be in [0, 1] (0: off)"),
    ({"stop_at_target": True},
     "config.stop_at_target=True: needs a target_accuracy > 0"),
    ({"target_accuracy": 0.9, "eval_every_steps": 0},
     "config.target_accuracy=0.9: needs evaluations during the run"),
    ({"model": "resnet18"}, "config.model='resnet18': unknown model; known: "
     "resnet101, resnet152, resnet50, resnet_tiny"),
    ({"dtype": "float64"}, "config.dtype='float64': must be one of float32, "
     "bfloat16"),
    ({"input_convention": "tf"}, "must be one of caffe, torch"),
    ({"image_size": 0}, "config.image_size=0: must be >= 28"),
    ({"aug_max_shift": -1}, "config.aug_max_shift=-1: must be >= 0"),
    ({"aug_max_shift": 14}, "config.aug_max_shift=14: must be < 14"),
    ({"aug_max_scale": 1.0}, "config.aug_max_scale=1.0: must be in [0, 1)"),
    ({"dropout_rate": 1.0}, "config.dropout_rate=1.0: must be in [0, 1)"),
    ({"learning_rate": float("inf")}, "config.learning_rate=inf: must be "
     "finite"),
    ({"learning_rate": float("nan")}, "config.learning_rate=nan: must be "
     "finite"),
    ({"num_epochs": float("inf")}, "config.num_epochs=inf: must be finite"),
    ({"num_epochs": float("nan")}, "config.num_epochs=nan: must be finite"),
    ({"num_epochs": -1.0}, "config.num_epochs=-1.0: must be > 0"),
    ({"num_epochs": float("inf"), "num_train_steps": 5},
     "config.num_epochs=inf: must be finite"),
    ({"weight_decay": float("inf")}, "config.weight_decay=inf: must be finite"),
    ({"momentum": float("nan")}, "config.momentum=nan: must be finite"),
    ({"seed": 2**70}, f"config.seed={2**70}: must be an integer in [0, 2**32)"),
    ({"seed": 2**32}, "config.seed=4294967296: must be an integer in "
     "[0, 2**32)"),
    ({"seed": -1}, "config.seed=-1: must be an integer in [0, 2**32)"),
    ({"hidden_units": ("abc",)}, "config.hidden_units=('abc',): must be "
     "positive integer widths"),
    ({"hidden_units": (8.5,)}, "config.hidden_units=(8.5,): must be positive"),
    ({"hidden_units": (True,)}, "config.hidden_units=(True,): must be "
     "positive"),
    ({"hidden_units": ((1, 2),)}, "config.hidden_units=((1, 2),): must be "
     "positive"),
    ({"num_train_steps": 0}, "config.num_train_steps=0"),
    ({"eval_every_steps": -2}, "config.eval_every_steps=-2"),
    ({"hidden_units": (8, 0)}, "config.hidden_units=(8, 0)"),
    ({"init": "imagenet", "model": "resnet_tiny"}, "config.init='imagenet': "
     "Keras has no ImageNet weights for resnet_tiny"),
])
def test_bad_value_names_its_key(overrides, message):
  with pytest.raises(ConfigError) as e:
    validation.validate_config(_smoke(**overrides))
  assert message in str(e.value)


def test_largest_seed_and_integer_widths_pass():
  validation.validate_config(_smoke(seed=2**32 - 1, hidden_units=(8, 16)))


def test_seed_limit_is_where_jax_keys_start_to_repeat():
  """jax.random.key keeps 32 bits: the first seed refused is the first that
  would silently give another seed's key."""
  import jax
  last, first_bad = validation.SEED_LIMIT - 1, validation.SEED_LIMIT
  data = jax.random.key_data
  assert (data(jax.random.key(last)) != data(jax.random.key(0))).any()
  assert (data(jax.random.key(first_bad)) == data(jax.random.key(0))).all()


def _cli_train(tmp_path, *overrides):
  import subprocess
  import sys

  from conftest import REPO_ROOT
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  # data_dir is absent: a config error must come before the data is read.
  return subprocess.run(
      [sys.executable, str(REPO_ROOT / "train.py"),
       "--config=configs/smoke.py", f"--workdir={tmp_path / 'run'}",
       f"--config.data_dir={tmp_path / 'no_data'}", "--config.download=false",
       *overrides], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=120)


@pytest.mark.parametrize("override, message", [
    ("--config.num_epochs=inf", "error: config.num_epochs=inf: must be "
     "finite"),
    (f"--config.seed={2**70}", f"error: config.seed={2**70}: must be an "
     "integer in [0, 2**32)"),
    ("--config.hidden_units=abc", "error: config.hidden_units=('abc',): "
     "must be positive integer widths"),
    ("--config.learning_rate=inf", "error: config.learning_rate=inf: must be "
     "finite"),
])
def test_cli_config_errors_are_one_line_before_the_data(tmp_path, override,
                                                        message):
  result = _cli_train(tmp_path, override)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), result.stderr
  assert not (tmp_path / "run").exists()


# --- Splits ----------------------------------------------------------------


def _splits(tmp_path, train: int = 40, test: int = 12):
  from mnist_resnet.data import idx
  from mnist_resnet.data import mnist
  rng = np.random.default_rng(0)
  for split, n in (("train", train), ("test", test)):
    images, labels = mnist.SPLIT_FILES[split]
    idx.write_idx(tmp_path / (images + ".gz"),
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    idx.write_idx(tmp_path / (labels + ".gz"),
                  (np.arange(n) % 10).astype(np.uint8))
  return mnist.load_mnist(tmp_path, check_md5=False)


@pytest.mark.parametrize("train, test, culprit", [
    (40, 0, "t10k-images-idx3-ubyte.gz: the test split holds 0 images"),
    (0, 12, "train-images-idx3-ubyte.gz: the train split holds 0 images"),
])
def test_empty_split_names_its_file(tmp_path, train, test, culprit):
  """Refused as the data loads, before the run (training would fail only at
  its first evaluation on a 0-image test split)."""
  from mnist_resnet.core.errors import DataError
  from mnist_resnet.data import source
  _splits(tmp_path, train, test)
  with pytest.raises(DataError) as e:
    source.load(source.IDX, tmp_path, download=False, check_md5=False)
  assert str(e.value) == f"{tmp_path}/{culprit}"


def test_valid_splits_pass_and_the_batch_must_fit(tmp_path):
  splits = _splits(tmp_path)
  validation.validate_splits(_smoke(data_dir=str(tmp_path), batch_size=40),
                             splits)
  with pytest.raises(ConfigError, match="larger than the 40 training"):
    validation.validate_splits(_smoke(data_dir=str(tmp_path), batch_size=41),
                               splits)


# --- Workdir ---------------------------------------------------------------


def test_workdir_checks(tmp_path):
  validation.validate_workdir(str(tmp_path))
  validation.validate_workdir(str(tmp_path / "new" / "deeper"))
  validation.validate_workdir("gs://bucket/run")  # The storage layer's.
  for empty in ("", "  "):
    with pytest.raises(ConfigError, match="--workdir=.*: must name a dir"):
      validation.validate_workdir(empty)
  (tmp_path / "file").write_text("x")
  for workdir, reason in (
      (tmp_path / "file", f"{tmp_path}/file is a file, not a directory"),
      (tmp_path / "file" / "run", f"{tmp_path}/file is a file, not a "
       "directory"),
      (tmp_path / ("x" * 300) / "run", f"the name {'x' * 32}... is longer "
       "than 255 bytes")):
    with pytest.raises(ConfigError) as e:
      validation.validate_workdir(str(workdir))
    assert str(e.value) == f"--workdir={workdir}: {reason}"
  (tmp_path / "link").symlink_to(tmp_path / "gone")
  with pytest.raises(ConfigError, match="link is a broken symbolic link"):
    validation.validate_workdir(str(tmp_path / "link" / "run"))


def test_workdir_on_a_read_only_file_system(tmp_path):
  # A read-only mount, not permissions: tests may run as root.
  from test_cli import tmpfs
  with tmpfs(tmp_path / "ro", "ro,size=64k") as read_only:
    for workdir in (read_only, read_only / "run"):
      with pytest.raises(ConfigError) as e:
        validation.validate_workdir(str(workdir))
      assert str(e.value) == (f"--workdir={workdir}: cannot write in "
                              f"{read_only}: Read-only file system")


def test_batch_larger_than_the_data():
  validation.validate_batch_fits(_smoke(batch_size=128), 128)
  with pytest.raises(ConfigError, match="config.batch_size=128: larger than "
                     "the 100 training images"):
    validation.validate_batch_fits(_smoke(batch_size=128), 100)


def test_readme_config_table_lists_every_config():
  """The README's table of configs names exactly the files in configs/."""
  import re

  from conftest import REPO_ROOT
  readme = (REPO_ROOT / "README.md").read_text()
  table = readme[readme.index("| config | what it is |"):]
  table = table[:table.index("\n\n")]
  named = set(re.findall(r"`(\w+)\.py`", table))
  files = {p.stem for p in (REPO_ROOT / "configs").glob("*.py")} - {
      "__init__"}
  assert named == files
  assert set(SHIPPED) | {"benchmark"} == files
