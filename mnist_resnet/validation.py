"""Every check of a training config, before data is read or anything compiles.

The rest of the code trusts its inputs: a bad value is reported here, once,
naming the key, and never deep inside a jitted function.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from mnist_resnet import mnist
from mnist_resnet import models
from mnist_resnet import pretrained
from mnist_resnet import preprocess
from mnist_resnet.errors import ConfigError

_CHOICES = {
    "init": ("imagenet", "scratch"),
    "input_convention": preprocess.CONVENTIONS,
    "optimizer": ("sgd", "adamw"),
    "trainable": ("all", "head"),
    "dtype": tuple(models.DTYPES),
}
_POSITIVE = ("batch_size", "eval_batch_size", "log_every_steps",
             "checkpoint_every_steps", "max_checkpoints_to_keep",
             "learning_rate")
_NON_NEGATIVE = ("warmup_steps", "weight_decay", "grad_clip_norm",
                 "backbone_lr_multiplier", "profile_steps", "aug_max_shift",
                 "aug_max_rotation")
_FRACTIONS = ("label_smoothing", "dropout_rate", "bn_momentum", "ema_decay",
              "aug_max_scale")


def _fail(config: ml_collections.ConfigDict, key: str, why: str):
  raise ConfigError(f"config.{key}={config[key]!r}: {why}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key."""
  for key, options in _CHOICES.items():
    if config[key] not in options:
      _fail(config, key, f"must be one of {', '.join(options)}")
  if config.model not in models.MODELS:
    _fail(config, "model",
          f"unknown model; known: {', '.join(sorted(models.MODELS))}")
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
  if not math.isfinite(config.learning_rate):
    _fail(config, "learning_rate", "must be finite")
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
  if any(int(u) <= 0 for u in config.hidden_units):
    _fail(config, "hidden_units", "every width must be > 0")
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
