"""Numerical check of converted weights against Keras's own ResNet.

Loads a Keras weight file into `keras.applications` and compares its pooled
features with the Flax backbone's (inference mode, float32) on random
caffe-preprocessed batches at 32x32 and 224x224 and on MNIST-like digits
prepared by `preprocess.to_model_input`.
"""

from collections.abc import Mapping
import functools
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnist_resnet.core import tf_host
from mnist_resnet.core.errors import WeightsError
from mnist_resnet.data import mnist
from mnist_resnet.model import preprocess
from mnist_resnet.model import pretrained
from mnist_resnet.model import resnet

VERIFY_TOLERANCE = 1e-5
# (input, image size, batch): small batches keep the 224x224 check quick on
# a CPU while still covering the fine-tuning resolution.
_VERIFY_BATCHES = (("random", 32, 8), ("random", 224, 2), ("mnist", 32, 8))
# File name Keras's `load_weights` needs to pick the right reader per layout.
_KERAS_FILE_NAME = {"legacy": "w.h5", "model_weights": "w.h5",
                    "keras3": "w.weights.h5", "keras_zip": "w.keras"}


def _keras_model(model_name: str, size: int, weights_path: str, layout: str):
  keras = tf_host.import_keras()
  builder = getattr(keras.applications,
                    pretrained.KERAS_APPLICATIONS[model_name])
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
  model = resnet.create_model(model_name)
  return jax.jit(lambda v, x: model.apply(v, x, train=False,
                                          method=resnet.ResNet.features))


def _mnist_like(batch: int, rng: np.random.Generator) -> np.ndarray:
  """Digit-like uint8 strokes on a black background."""
  images = np.zeros((batch, mnist.IMAGE_SIZE, mnist.IMAGE_SIZE), np.uint8)
  for image in images:
    top, left = rng.integers(3, 10, 2)
    image[top:top + 16, left:left + 4] = rng.integers(120, 256, (16, 4))
    image[top + 12:top + 16, left:left + 12] = 255
  return images


def verify(variables: Mapping[str, Any], model_name: str, weights_path: str,
           layout: str, seed: int = 0) -> dict[str, Any]:
  """Compares Flax and Keras pooled features on the same inputs.

  `variables` hold the backbone; `weights_path` is the Keras file of
  `layout` that Keras loads. Differences are maxima over all checks, the
  relative one against the largest Keras feature of the same check.
  """
  keras = tf_host.import_keras()
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
