"""TensorFlow and Keras for host-side work only, never on the accelerators.

TensorFlow is needed for tf.data and the SavedModel export, Keras for its
ImageNet download and the converter's check against Keras (TensorBoard event
files are written by tensorboardX, Keras weight files read with h5py). The
GPUs belong to JAX: importing through here hides them from TensorFlow before
it can take their memory (flax#445).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

_gpus_hidden = False


def import_tensorflow() -> Any:
  """Imports TensorFlow, hiding the GPUs from it the first time."""
  global _gpus_hidden
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not _gpus_hidden:
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF's devices are already initialised.
      logging.warning("TensorFlow was initialised before the GPUs could be "
                      "hidden from it")
    _gpus_hidden = True
  return tf


def import_keras() -> Any:
  """Imports Keras, after TensorFlow (its usual backend) let go of the GPUs."""
  try:
    import_tensorflow()
  except ImportError:
    pass  # Another Keras backend.
  import keras  # pylint: disable=g-import-not-at-top
  return keras
