"""Pretrained weights in and out of `resnet.ResNet`'s variables.

Keras weight files (any layout `keras_h5` reads) fill the backbone by name:
the Flax backbone's module names are Keras's layer names, every Keras weight
is used exactly once, every backbone leaf is filled and every shape is
checked. `python -m mnist_resnet.convert` stores the result as an orbax
directory (`save_variables`), which `load_backbone` takes as well. Anything
wrong is a one-line `WeightsError` naming the file and the layer.
"""

from collections.abc import Mapping
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnist_resnet.core import files
from mnist_resnet.core import tf_host
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.core.errors import WeightsError
from mnist_resnet.model import keras_h5

# Our model name -> its builder in `keras.applications`.
KERAS_APPLICATIONS = {"resnet50": "ResNet50", "resnet101": "ResNet101",
                      "resnet152": "ResNet152"}
_IMAGENET_URL = ("https://storage.googleapis.com/tensorflow/"
                 "keras-applications/resnet/")
# keras/src/applications/resnet.py WEIGHTS_HASHES, the "notop" entries.
_IMAGENET_NOTOP_MD5 = {
    "resnet50": "4d473c1dd8becc155b73f8504c6f6626",
    "resnet101": "88cf7a10940856eca736dc7b7e228a21",
    "resnet152": "ee4c566cf9a93f14d82f913c2dc6dd0c",
}
# Models Keras publishes ImageNet weights for.
IMAGENET_MODELS = tuple(_IMAGENET_NOTOP_MD5)


def _shape(shape: tuple[int, ...]) -> str:
  return "(" + ",".join(str(d) for d in shape) + ("," if len(shape) == 1
                                                  else "") + ")"


def _expected(module: Mapping[str, Any], stats: Mapping[str, Any] | None
              ) -> list[tuple[str, tuple[str, str]]]:
  """(Keras weight name, (collection, Flax leaf)) pairs of one module.

  In Keras's weight order, which is also the dataset order of every layout
  ('legacy' files name the datasets, 'keras3' numbers them).
  """
  if "kernel" in module:
    return [("kernel", ("params", "kernel")), ("bias", ("params", "bias"))]
  if "scale" in module and stats is not None:
    return [("gamma", ("params", "scale")), ("beta", ("params", "bias")),
            ("moving_mean", ("batch_stats", "mean")),
            ("moving_variance", ("batch_stats", "var"))]
  raise ValueError(f"unexpected backbone module with leaves {sorted(module)}")


def load_keras_weights(path: str, variables: Mapping[str, Any]
                       ) -> dict[str, Any]:
  """Fills the backbone of a ResNet's {'params', 'batch_stats'} from `path`.

  The head is returned as given (Keras's notop files have none that fits an
  MNIST head). Backbone leaves of `variables` may be abstract
  (`jax.eval_shape` output): only their shapes and dtypes are used.
  """
  where = str(path)
  layers, _ = keras_h5.read_keras_weights(path)
  params = variables["params"]["backbone"]
  stats = variables.get("batch_stats", {}).get("backbone", {})
  new_params: dict[str, dict[str, Any]] = {}
  new_stats: dict[str, dict[str, Any]] = {}
  for name, module in params.items():
    pairs = _expected(module, stats.get(name))
    if name not in layers:
      first_name, (collection, leaf) = pairs[0]
      shape = (module if collection == "params" else stats[name])[leaf].shape
      raise WeightsError(f"{where}: layer {name} is missing from the file "
                         f"(model expects {first_name} {_shape(shape)})")
    found = layers.pop(name)
    wanted = [k for k, _ in pairs]
    names = [n for n, _ in found]
    if sorted(n or "" for n in names) == sorted(wanted):
      found = sorted(found, key=lambda item: wanted.index(item[0]))
    elif len(found) != len(wanted):
      raise WeightsError(
          f"{where}: layer {name} has {len(found)} weights "
          f"({', '.join(n or '?' for n in names)}), model expects "
          f"{len(wanted)} ({', '.join(wanted)})")
    # Otherwise unnamed (Keras 3) or oddly named weights: Keras's own loader
    # is positional too.
    for (keras_name, (collection, leaf)), (_, value) in zip(pairs, found):
      target = (module if collection == "params" else stats[name])[leaf]
      if tuple(value.shape) != tuple(target.shape):
        raise WeightsError(
            f"{where}: layer {name} {keras_name} has shape "
            f"{_shape(value.shape)}, model expects {_shape(target.shape)}")
      if not np.all(np.isfinite(value)):
        raise WeightsError(f"{where}: layer {name} {keras_name} has "
                           "non-finite values")
      out = new_params if collection == "params" else new_stats
      out.setdefault(name, {})[leaf] = jnp.asarray(value, dtype=target.dtype)
  extra = sorted(n for n, weights in layers.items() if weights)
  if extra:
    shapes = ", ".join(_shape(a.shape) for _, a in layers[extra[0]])
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise WeightsError(f"{where}: layer {extra[0]} {shapes} has no "
                       f"counterpart in the model{more}")
  result = {k: dict(v) for k, v in variables.items()}
  result["params"] = {**variables["params"], "backbone": new_params}
  if new_stats or "batch_stats" in variables:
    result["batch_stats"] = {**variables.get("batch_stats", {}),
                             "backbone": new_stats}
  return result


def imagenet_weights_path(
    model_name: str = "resnet50",
    local_hint: str = "--config.pretrained_weights=PATH") -> str:
  """Local path of Keras's ImageNet notop file, downloaded by Keras if needed.

  Keras's cache (~/.keras/models, or $KERAS_HOME/models) is used so a file
  already fetched by `keras.applications` is found without network access.
  `local_hint` is the caller's flag for a local file, named when the
  download fails.
  """
  if model_name not in _IMAGENET_NOTOP_MD5:
    raise ConfigError(f"Keras has no ImageNet weights for {model_name!r}; "
                      f"models with them: {', '.join(_IMAGENET_NOTOP_MD5)}")
  file_name = f"{model_name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
  try:
    keras = tf_host.import_keras()
    return keras.utils.get_file(file_name, _IMAGENET_URL + file_name,
                                cache_subdir="models",
                                file_hash=_IMAGENET_NOTOP_MD5[model_name])
  except Exception as e:  # pylint: disable=broad-except
    reason = " ".join(str(e).split())[:200] or type(e).__name__
    raise WeightsError(
        f"could not download Keras's ImageNet "
        f"{KERAS_APPLICATIONS[model_name]} weights ({reason}): pass a local "
        f"file with {local_hint} (the file Keras caches as "
        f"~/.keras/models/{file_name})") from None


def resolve_weights(pretrained_weights: str, model_name: str) -> str:
  """Local path of the pretrained weights: `pretrained_weights` (a Keras file
  or a converted directory), or else Keras's ImageNet file for `model_name`
  from its cache, downloaded on first use."""
  if not pretrained_weights:
    return imagenet_weights_path(model_name)
  path = os.path.expanduser(pretrained_weights)
  if not os.path.exists(path):
    raise WeightsError(f"config.pretrained_weights={pretrained_weights!r}: "
                       "no such file or directory")
  return path


def require_new_directory(out_dir: str) -> str:
  """Absolute `out_dir`, which must not exist or be an empty directory: a
  conversion never overwrites anything. Its parent must be writable (checked
  before any work)."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir)
                                  or os.listdir(out_dir)):
    raise ConfigError(f"--out {out_dir} already exists and is not empty; "
                      "refusing to overwrite it")
  # Orbax writes a sibling temporary directory, then renames it to out_dir.
  files.check_writable_dir(os.path.dirname(out_dir), f"--out {out_dir}")
  return out_dir


def save_variables(variables: Mapping[str, Any], out_dir: str) -> None:
  """Writes {'params', 'batch_stats'} as an orbax checkpoint at `out_dir`.

  Orbax writes into a temporary directory and renames it when complete, so
  an interrupted run leaves no half-written checkpoint. An existing empty
  directory is replaced; a non-empty one is refused (ConfigError).
  """
  out_dir = require_new_directory(out_dir)
  if os.path.exists(out_dir):
    os.rmdir(out_dir)  # Orbax's final rename needs the name free.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(out_dir, dict(variables))
      checkpointer.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    # Disk full or read-only: tensorstore reports some as ValueError.
    failure = files.write_failure(e)
    if failure is None:
      raise
    raise failure from None


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


def load_backbone(source: str, variables: Mapping[str, Any],
                  model_name: str) -> dict:
  """Host copy of {'params', 'batch_stats'} `variables` with the backbone
  from `source`: a Keras weight file or a directory written by
  `python -m mnist_resnet.convert`. `model_name` only names the model in
  errors."""
  host = jax.device_get(variables)
  if not os.path.isdir(source):
    return load_keras_weights(source, host)
  loaded = restore_variables(source)
  merged = {}
  for col in ("params", "batch_stats"):
    want = host[col]["backbone"]
    have = loaded.get(col, {}).get("backbone")
    if have is None or jax.tree.structure(have) != jax.tree.structure(want):
      raise WeightsError(f"{source}: converted weights do not fit "
                         f"{model_name} ({col}/backbone differs)")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(have),
                            jax.tree.leaves(want)):
      if np.shape(a) != np.shape(b):
        raise WeightsError(
            f"{source}: {col}/backbone{jax.tree_util.keystr(path)} has "
            f"shape {np.shape(a)}, {model_name} expects {np.shape(b)}")
    merged[col] = {**host[col], "backbone": have}
  return merged
