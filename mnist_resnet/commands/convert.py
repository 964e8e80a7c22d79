"""Converts a Keras ResNet weight file into an orbax checkpoint of the backbone.

    python -m mnist_resnet.convert --keras_weights=PATH|imagenet --out=DIR \\
        [--model=resnet50] [--verify]

Training starts from DIR with `--config.pretrained_weights=DIR`
(`pretrained.load_backbone`); `--verify` checks the result against Keras's
own model (`keras_parity.verify`): docs/training.md#pretrained-weights.
"""

import argparse
from collections.abc import Mapping
from collections.abc import Sequence
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp

from mnist_resnet.core import cli
from mnist_resnet.core import files
from mnist_resnet.core.errors import EXIT_USER_ERROR
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.core.errors import MnistResnetError
from mnist_resnet.model import keras_h5
from mnist_resnet.model import keras_parity
from mnist_resnet.model import pretrained
from mnist_resnet.model import resnet


def _backbone(variables: Mapping[str, Any]) -> dict[str, Any]:
  return {k: {"backbone": v["backbone"]} for k, v in variables.items()
          if "backbone" in v}


def convert(keras_weights: str, model_name: str = "resnet50"
            ) -> tuple[dict[str, Any], str, str]:
  """Backbone variables from a Keras file (or 'imagenet'), its path, layout."""
  # The file first: a missing one is reported before the model is traced.
  path = (pretrained.imagenet_weights_path(
      model_name, local_hint="--keras_weights=PATH")
          if keras_weights == "imagenet" else os.path.expanduser(keras_weights))
  _, layout = keras_h5.read_keras_weights(path)
  model = resnet.create_model(model_name)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  variables = pretrained.load_keras_weights(path, abstract)
  return _backbone(variables), path, layout


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m mnist_resnet.convert",
      description="Convert Keras ResNet weights to an orbax checkpoint.")
  parser.add_argument("--keras_weights", required=True,
                      help="Keras weight file (.h5, .weights.h5, .keras) or "
                           "'imagenet' for Keras's cached ImageNet weights")
  parser.add_argument("--out", required=True,
                      help="new (or empty) checkpoint directory")
  parser.add_argument("--model", default="resnet50", help=", ".join(
      resnet.MODELS))
  parser.add_argument("--verify", action="store_true",
                      help="compare with Keras's own model on the same inputs")
  return parser.parse_args(argv)


def _check_arguments(args: argparse.Namespace) -> str:
  """The absolute --out; every argument is checked before any work."""
  if args.model not in resnet.MODELS:
    raise ConfigError(f"unknown model {args.model!r}; known: "
                      f"{', '.join(resnet.MODELS)}")
  if args.verify and args.model not in pretrained.KERAS_APPLICATIONS:
    raise ConfigError(
        f"--verify compares with Keras, which has no {args.model!r}; known: "
        f"{', '.join(pretrained.KERAS_APPLICATIONS)}")
  return pretrained.require_new_directory(args.out)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  try:
    out = _check_arguments(args)
    variables, path, layout = convert(args.keras_weights, args.model)
    pretrained.save_variables(variables, out)
    counts = resnet.count_params(variables)
    print(f"wrote {out}: {counts['trainable']:,} params, "
          f"{counts['batch_stats']:,} batch statistics from {path} "
          f"({layout} layout)")
    if not args.verify:
      return 0
    report = keras_parity.verify(pretrained.restore_variables(out),
                                 args.model, path, layout)
  except MnistResnetError as e:
    return _user_error(e)
  except Exception as e:  # pylint: disable=broad-except
    failure = files.write_failure(e)  # Disk full, read-only, ...
    if failure is None:
      raise
    return _user_error(failure)
  print(json.dumps(report))
  return 0 if report["max_rel_diff"] <= keras_parity.VERIFY_TOLERANCE else 1


def _user_error(e: Exception) -> int:
  print(f"error: {e}", file=sys.stderr, flush=True)
  return EXIT_USER_ERROR


def run() -> None:
  """The command, as `python -m` runs it."""
  cli.quiet_failed_writes()
  # A failed save leaves orbax threads that never end: exit_process ends
  # the process anyway.
  cli.exit_process(main())


if __name__ == "__main__":
  run()
