"""Converts a Keras ResNet weight file into an orbax checkpoint of the backbone.

    python -m mnist_resnet.convert --keras_weights=PATH|imagenet --out=DIR \\
        [--model=resnet50] [--verify]

The checkpoint holds {'params': {'backbone': ...}, 'batch_stats':
{'backbone': ...}}: the backbone only, because Keras's notop files have no
head that fits an MNIST classifier. Training starts from it with
`restore_variables(DIR)`.

`--verify` loads the same file into Keras's own ResNet50 and compares pooled
features of Keras and of the restored checkpoint (inference mode, float32) on
random caffe-preprocessed batches at 32x32 and 224x224 and on MNIST-like
digits prepared by `preprocess.to_model_input`. The last stdout line is JSON;
the exit code is 1 when the relative difference exceeds 1e-5.
"""

import argparse
import functools
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnist_resnet import models, preprocess, pretrained
from mnist_resnet.errors import EXIT_USER_ERROR, ConfigError, MnistResnetError
from mnist_resnet.errors import WeightsError

VERIFY_TOLERANCE = 1e-5
# (input, image size, batch): small batches keep the 224x224 check quick on
# a CPU while still covering the fine-tuning resolution.
_VERIFY_BATCHES = (("random", 32, 8), ("random", 224, 2), ("mnist", 32, 8))
# File name Keras's `load_weights` needs to pick the right reader per layout.
_KERAS_FILE_NAME = {"legacy": "w.h5", "model_weights": "w.h5",
                    "keras3": "w.weights.h5", "keras_zip": "w.keras"}
_KERAS_BUILDERS = {"resnet50": "ResNet50", "resnet101": "ResNet101",
                   "resnet152": "ResNet152"}


def _backbone(variables: Mapping[str, Any]) -> dict[str, Any]:
  return {k: {"backbone": v["backbone"]} for k, v in variables.items()
          if "backbone" in v}


def save_variables(variables: Mapping[str, Any], out_dir: str) -> None:
  """Writes {'params', 'batch_stats'} as an orbax checkpoint at `out_dir`.

  Orbax writes into a temporary directory and renames it when complete, so
  an interrupted run leaves no half-written checkpoint. An existing empty
  directory is replaced; a non-empty one is refused (ConfigError).
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    if not os.path.isdir(out_dir) or os.listdir(out_dir):
      raise ConfigError(f"--out {out_dir} already exists and is not empty; "
                        "refusing to overwrite it")
    os.rmdir(out_dir)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(out_dir, dict(variables))
      checkpointer.wait_until_finished()
  except OSError as e:
    raise ConfigError(f"--out {out_dir}: cannot write the checkpoint "
                      f"({' '.join(str(e).split())[:200]})") from None


def restore_variables(out_dir: str, target: Any = None) -> dict[str, Any]:
  """Reads a checkpoint written by `save_variables`.

  Without `target`, leaves come back as host numpy arrays, whatever devices
  wrote the checkpoint, so the caller can place them on its own mesh; with a
  `target` tree (arrays or `jax.ShapeDtypeStruct`s with shardings), orbax
  restores straight into that placement.
  """
  out_dir = os.path.abspath(out_dir)
  if not os.path.isdir(out_dir):
    raise WeightsError(f"{out_dir}: no converted checkpoint there")
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      if target is None:
        metadata = checkpointer.metadata(out_dir).item_metadata
        target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype),
                              getattr(metadata, "tree", metadata))
      return checkpointer.restore(out_dir, target)
  except (FileNotFoundError, ValueError) as e:
    reason = " ".join(str(e).split())[:200]
    raise WeightsError(f"{out_dir}: not a readable checkpoint "
                       f"({reason})") from None


def convert(keras_weights: str, model_name: str = "resnet50"
            ) -> tuple[dict[str, Any], str, str]:
  """Backbone variables from a Keras file (or 'imagenet'), its path, layout."""
  model = models.create_model(model_name)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  path = (pretrained.imagenet_weights_path(model_name)
          if keras_weights == "imagenet" else os.path.expanduser(keras_weights))
  _, layout = pretrained.read_keras_weights(path)
  variables = pretrained.load_keras_weights(path, abstract)
  return _backbone(variables), path, layout


def _keras_model(model_name: str, size: int, weights_path: str, layout: str):
  keras = pretrained.import_keras()
  builder = getattr(keras.applications, _KERAS_BUILDERS[model_name])
  model = builder(weights=None, include_top=False, pooling="avg",
                  input_shape=(size, size, 3))
  # Keras picks its reader from the file name; a link with the right suffix
  # lets any file name through.
  with tempfile.TemporaryDirectory() as tmp:
    link = os.path.join(tmp, _KERAS_FILE_NAME[layout])
    os.symlink(os.path.abspath(weights_path), link)
    try:
      if layout in ("legacy", "model_weights"):
        model.load_weights(link, by_name=True)
      else:
        model.load_weights(link)
    except Exception as e:  # pylint: disable=broad-except
      reason = " ".join(str(e).split())[:200] or type(e).__name__
      raise WeightsError(f"{weights_path}: Keras's own loader rejects the "
                         f"file, nothing to compare with ({reason})") from None
  return model


@functools.lru_cache(maxsize=None)
def _features_fn(model_name: str):
  """Jitted inference features, one per model: repeated runs compile once."""
  model = models.create_model(model_name)
  return jax.jit(lambda v, x: model.apply(v, x, train=False,
                                          method=models.ResNet.features))


def _mnist_like(batch: int, rng: np.random.Generator) -> np.ndarray:
  """Digit-like uint8 strokes on a black background."""
  images = np.zeros((batch, 28, 28), np.uint8)
  for image in images:
    top, left = rng.integers(3, 10, 2)
    image[top:top + 16, left:left + 4] = rng.integers(120, 256, (16, 4))
    image[top + 12:top + 16, left:left + 12] = 255
  return images


def verify(variables: Mapping[str, Any], model_name: str, weights_path: str,
           layout: str, seed: int = 0) -> dict[str, Any]:
  """Compares Flax and Keras pooled features on the same inputs."""
  keras = pretrained.import_keras()
  features = _features_fn(model_name)
  rng = np.random.default_rng(seed)
  keras_models = {}
  checks = []
  for kind, size, batch in _VERIFY_BATCHES:
    if size not in keras_models:
      keras_models[size] = _keras_model(model_name, size, weights_path, layout)
    if kind == "random":
      rgb = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
      x = keras.applications.resnet.preprocess_input(rgb)
    else:
      x = np.asarray(preprocess.to_model_input(
          jnp.asarray(_mnist_like(batch, rng)), image_size=size))
    expected = np.asarray(keras_models[size](x, training=False))
    with jax.default_matmul_precision("highest"):
      ours = np.asarray(features(variables, x))
    abs_diff = float(np.max(np.abs(ours - expected)))
    checks.append({"input": kind, "size": size, "batch": batch,
                   "max_abs_diff": abs_diff,
                   "max_rel_diff": abs_diff / float(np.max(np.abs(expected)))})
  return {"max_abs_diff": max(c["max_abs_diff"] for c in checks),
          "max_rel_diff": max(c["max_rel_diff"] for c in checks),
          "sizes": sorted({c["size"] for c in checks}),
          "layout": layout, "checks": checks}


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
      models.MODELS))
  parser.add_argument("--verify", action="store_true",
                      help="compare with Keras's own model on the same inputs")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  try:
    if args.model not in models.MODELS:
      raise ConfigError(f"unknown model {args.model!r}; known: "
                        f"{', '.join(models.MODELS)}")
    if args.verify and args.model not in _KERAS_BUILDERS:
      raise ConfigError(f"--verify compares with Keras, which has no "
                        f"{args.model!r}; known: {', '.join(_KERAS_BUILDERS)}")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
      raise ConfigError(f"--out {out} already exists and is not empty; "
                        "refusing to overwrite it")
    variables, path, layout = convert(args.keras_weights, args.model)
    save_variables(variables, out)
    counts = models.count_params(variables)
    print(f"wrote {out}: {counts['trainable']:,} params, "
          f"{counts['batch_stats']:,} batch statistics from {path} "
          f"({layout} layout)")
    if not args.verify:
      return 0
    report = verify(restore_variables(out), args.model, path, layout)
  except MnistResnetError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  print(json.dumps(report))
  return 0 if report["max_rel_diff"] <= VERIFY_TOLERANCE else 1


if __name__ == "__main__":
  sys.exit(main())
