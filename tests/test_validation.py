"""Config validation: every shipped config passes, every bad value is named."""

from __future__ import annotations

import importlib

import pytest

from mnist_resnet import validation
from mnist_resnet.errors import ConfigError

SHIPPED = ("default", "scratch", "smoke", "frozen_backbone", "gpu", "tpu")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_pass_validation(name):
  validation.validate_config(
      importlib.import_module(f"configs.{name}").get_config())


@pytest.mark.parametrize("base", ["", "gpu", "tpu", "scratch"])
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
    ({"learning_rate": float("nan")}, "config.learning_rate=nan: must be > 0"),
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
