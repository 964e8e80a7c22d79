"""Every check of a training config, before data is read or anything compiles.

The rest of the code trusts its inputs: a bad value is reported here, once,
naming the key, and never deep inside a jitted function.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping

import jax
import ml_collections

from mnist_resnet.core import files
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.data import input_pipeline
from mnist_resnet.data import mnist
from mnist_resnet.data import source
from mnist_resnet.model import preprocess
from mnist_resnet.model import pretrained
from mnist_resnet.model import resnet

_CHOICES = {
    "init": ("imagenet", "scratch"),
    "input_convention": preprocess.CONVENTIONS,
    "optimizer": ("sgd", "adamw"),
    "trainable": ("all", "head"),
    "dtype": tuple(resnet.DTYPES),
    "input_pipeline": input_pipeline.PIPELINES,
    "conv_as_dot": resnet.CONV_AS_DOT_SETTINGS,
}
_POSITIVE = ("batch_size", "eval_batch_size", "log_every_steps",
             "checkpoint_every_steps", "max_checkpoints_to_keep",
             "learning_rate")
_NON_NEGATIVE = ("warmup_steps", "weight_decay", "grad_clip_norm",
                 "backbone_lr_multiplier", "profile_steps", "aug_max_shift",
                 "aug_max_rotation")
_FRACTIONS = ("label_smoothing", "dropout_rate", "bn_momentum", "ema_decay",
              "aug_max_scale")
# jax.random.key keeps the low 32 bits of a seed (without jax_enable_x64):
# seed 2**32 would silently be seed 0, and -1 be 2**32 - 1.
SEED_LIMIT = 2**32


def _fail(config: ml_collections.ConfigDict, key: str, why: str):
  raise ConfigError(f"config.{key}={config[key]!r}: {why}")


def _check_finite(config: ml_collections.ConfigDict) -> None:
  """No float key has a meaning at inf or nan (a learning rate of inf
  trains to NaN, num_epochs=inf never ends)."""
  for key, value in config.items():
    if isinstance(value, float) and not math.isfinite(value):
      _fail(config, key, "must be finite")


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_seed(config: ml_collections.ConfigDict) -> None:
  if not (_is_int(config.seed) and 0 <= config.seed < SEED_LIMIT):
    _fail(config, "seed", "must be an integer in [0, 2**32)")


def _check_hidden_units(config: ml_collections.ConfigDict) -> None:
  # A command-line value that is not a tuple of integers arrives as a tuple
  # of strings ('abc',) or floats.
  units = config.hidden_units
  if not isinstance(units, (tuple, list)) or not all(
      _is_int(u) and u > 0 for u in units):
    _fail(config, "hidden_units", "must be positive integer widths, e.g. "
          "(256,) or 256,128; () for a single dense layer")


def _check_target(config: ml_collections.ConfigDict) -> None:
  if not 0 <= config.target_accuracy <= 1:
    _fail(config, "target_accuracy", "must be in [0, 1] (0: off)")
  if config.stop_at_target and not config.target_accuracy:
    _fail(config, "stop_at_target", "needs a target_accuracy > 0")
  if config.target_accuracy and config.eval_every_steps == 0:
    _fail(config, "target_accuracy", "needs evaluations during the run: "
          "eval_every_steps 0 only evaluates at the end")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key."""
  _check_finite(config)
  _check_seed(config)
  _check_hidden_units(config)
  _check_target(config)
  for key, options in _CHOICES.items():
    if config[key] not in options:
      _fail(config, key, f"must be one of {', '.join(options)}")
  input_pipeline.check_available(config.input_pipeline)
  source.check(config.dataset)
  if config.model not in resnet.MODELS:
    _fail(config, "model",
          f"unknown model; known: {', '.join(sorted(resnet.MODELS))}")
  if config.init == "imagenet" and not config.pretrained_weights and (
      config.model not in pretrained.IMAGENET_MODELS):
    _fail(config, "init", f"Keras has no ImageNet weights for {config.model}; "
          "use init=scratch or give --config.pretrained_weights=PATH")
  if config.init == "imagenet" and config.pretrained_weights:
    # A given path must exist (cheap to check); Keras's download waits until
    # a fresh start needs it.
    pretrained.resolve_weights(config.pretrained_weights, config.model)
  for key in _POSITIVE:
    if not config[key] > 0:
      _fail(config, key, "must be > 0")
  for key in _NON_NEGATIVE:
    if not config[key] >= 0:
      _fail(config, key, "must be >= 0")
  for key in _FRACTIONS:
    if not 0 <= config[key] < 1:
      _fail(config, key, "must be in [0, 1)")
  if config.num_train_steps != -1 and config.num_train_steps <= 0:
    _fail(config, "num_train_steps", "must be > 0, or -1 to use num_epochs")
  if config.num_train_steps == -1 and not config.num_epochs > 0:
    _fail(config, "num_epochs", "must be > 0 when num_train_steps is -1")
  if config.eval_every_steps < -1:
    _fail(config, "eval_every_steps",
          "must be > 0, 0 (only at the end) or -1 (every epoch)")
  digit = mnist.IMAGE_SIZE
  if config.image_size < digit:
    _fail(config, "image_size", f"must be >= {digit} (the digits are "
          f"{digit}x{digit})")
  if config.aug_max_shift >= digit // 2:
    _fail(config, "aug_max_shift", f"must be < {digit // 2} pixels")
  # The train batch is split evenly over the devices; evaluation pads its
  # batch to a multiple of the device count instead.
  if config.batch_size % jax.device_count():
    _fail(config, "batch_size",
          f"must be divisible by the {jax.device_count()} devices")


def validate_batch_fits(config: ml_collections.ConfigDict,
                        num_train_examples: int) -> None:
  """The train batch must fit in one epoch of the data that was loaded."""
  if config.batch_size > num_train_examples:
    _fail(config, "batch_size",
          f"larger than the {num_train_examples} training images")


def validate_splits(config: ml_collections.ConfigDict,
                    splits: Mapping[str, mnist.Split]) -> None:
  """The loaded data can be trained on: the train batch fits in one epoch
  (source.load has refused empty splits: a 0-image test split would fail
  only after training)."""
  validate_batch_fits(config, len(splits["train"].labels))


def validate_workdir(workdir: str) -> None:
  """A workdir that cannot hold the run is reported before anything runs.

  Local paths: a component that is a file, a read-only file system, no
  permission, a name too long. gs://: a bucket name Cloud Storage accepts;
  the rest is found by the lock, which reaches the bucket first.
  """
  if not isinstance(workdir, str) or not workdir.strip():
    raise ConfigError(f"--workdir={workdir!r}: must name a directory for "
                      "checkpoints and results")
  if files.is_remote(workdir):
    files.check_bucket_name(workdir, f"--workdir={workdir}")
    return
  files.check_writable_dir(workdir, f"--workdir={workdir}")
