"""The held-out validation split: the best checkpoint is chosen on it,
never on the test set."""

from __future__ import annotations

from mnist_resnet.core.errors import ConfigError
from mnist_resnet.data import mnist


def hold_out_validation(splits: dict[str, mnist.Split],
                        num_examples: int) -> dict[str, mnist.Split]:
  """Moves the last `num_examples` training examples into a "validation"
  split: the best checkpoint is chosen on it, never on the test set."""
  if num_examples == 0:
    return splits
  train = splits["train"]
  if not 0 < num_examples < len(train.labels):
    raise ConfigError(
        f"config.validation_examples={num_examples} must be in [0, "
        f"{len(train.labels)}): the training split holds "
        f"{len(train.labels)} examples")
  keep = len(train.labels) - num_examples
  return {**splits,
          "train": mnist.Split(train.images[:keep], train.labels[:keep]),
          "validation": mnist.Split(train.images[keep:], train.labels[keep:])}
