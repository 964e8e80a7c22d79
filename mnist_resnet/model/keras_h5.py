"""Keras weight files, every layout a user meets, read with h5py (no Keras).

The layouts 'legacy' (Keras 2 `save_weights`, Keras's ImageNet downloads),
'model_weights' (`model.save("x.h5")`), 'keras3' (Keras 3
`save_weights("x.weights.h5")`) and 'keras_zip' (a `.keras` archive) all
become `LayerWeights`; a file that is none of them, or is inconsistent, is a
one-line `WeightsError` naming the file. Where each layout keeps its
weights: docs/training.md#pretrained-weights.
"""

from collections.abc import Iterator
import io
import os
import re
from typing import Any
import zipfile

import h5py
import numpy as np

from mnist_resnet.core.errors import WeightsError
from mnist_resnet.model.resnet import MODELS

# Layer name -> its weight arrays, as (name or None, array) in file order.
LayerWeights = dict[str, list[tuple[str | None, np.ndarray]]]


def _text(value: Any) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _array(dataset: h5py.Dataset) -> np.ndarray:
  value = np.asarray(dataset[()])
  if dataset.attrs.get("dtype") in ("bfloat16", b"bfloat16"):
    # Keras 3 stores bfloat16 variables as raw 2-byte values plus this tag.
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    value = value.view(ml_dtypes.bfloat16)
  return value


def _attr_list(group: h5py.Group, name: str) -> list[str]:
  """A list attribute, also when Keras split it into `name0`, `name1`, ...

  (HDF5 caps an object's header at 64 KiB, so Keras chunks long name lists.)
  """
  if name in group.attrs:
    return [_text(v) for v in group.attrs[name]]
  values, i = [], 0
  while f"{name}{i}" in group.attrs:
    values += [_text(v) for v in group.attrs[f"{name}{i}"]]
    i += 1
  return values


def _has_attr_list(group: h5py.Group, name: str) -> bool:
  return name in group.attrs or f"{name}0" in group.attrs


def _read_legacy(group: h5py.Group, where: str) -> LayerWeights:
  """`layer_names` / `weight_names` layout (Keras 2 and Keras 3 `.h5`)."""
  layers: LayerWeights = {}
  for layer_name in _attr_list(group, "layer_names"):
    if layer_name not in group:
      raise WeightsError(f"{where}: layer {layer_name} is listed in "
                         "layer_names but has no group")
    layer_group = group[layer_name]
    for weight_name in _attr_list(layer_group, "weight_names"):
      # 'conv1_conv/kernel:0' or 'conv1_conv/kernel'; in a nested model the
      # group is the inner model's and the weight's layer is in its name.
      parts = weight_name.split("/")
      name = parts[-2] if len(parts) > 1 else layer_name
      short = re.sub(r"(_\d+)?(:\d+)?$", "", parts[-1])
      if weight_name not in layer_group:
        raise WeightsError(f"{where}: layer {name} lists weight "
                           f"{weight_name} but the file has no such dataset")
      layers.setdefault(name, []).append((short, _array(layer_group[
          weight_name])))
  return layers


def _vars_groups(group: h5py.Group, path: str) -> Iterator[tuple[str,
                                                                 h5py.Group]]:
  """Every `vars` group holding datasets, with its path, depth first."""
  for key in group:
    child = group[key]
    if not isinstance(child, h5py.Group):
      continue
    child_path = f"{path}/{key}" if path else key
    if key == "vars" and len(child):
      yield child_path, child
    else:
      yield from _vars_groups(child, child_path)


def _numbered(group: h5py.Group) -> list[np.ndarray]:
  return [_array(group[k]) for k in sorted(group, key=int)]


def _read_keras3(h5: h5py.File, where: str) -> LayerWeights:
  """`layers/<path>/vars/<i>` layout of Keras 3 `.weights.h5`.

  Only `layers/` is read: a `.keras` file of a compiled model also holds the
  optimizer's variables, which are no layer's weights.
  """
  found = list(_vars_groups(h5["layers"], "layers"))
  if found and all("name" in g.attrs for _, g in found):
    layers: LayerWeights = {}
    for path, group in found:
      name = _text(group.attrs["name"])
      if name in layers:
        raise WeightsError(f"{where}: layer {name} appears twice "
                           f"(second at {path})")
      layers[name] = [(None, a) for a in _numbered(group)]
    return layers
  return _read_keras3_by_order(found, where)


def _keras_order(stage_sizes: tuple[int, ...]) -> list[str]:
  """ResNet v1 conv (or BN) layer stems in Keras's `model.layers` order."""
  order = ["conv1"]
  for stage, blocks in enumerate(stage_sizes):
    for block in range(blocks):
      name = f"conv{stage + 2}_block{block + 1}"
      # Keras lists the projection after the branch's 3x3 conv.
      suffixes = ("1", "2", "0", "3") if block == 0 else ("1", "2", "3")
      order += [f"{name}_{s}" for s in suffixes]
  return order


def _read_keras3_by_order(found: list[tuple[str, h5py.Group]],
                          where: str) -> LayerWeights:
  """Files without layer names: Keras numbers layers per class in order."""
  by_class: dict[str, dict[int, h5py.Group]] = {"conv2d": {},
                                                "batch_normalization": {}}
  parents = set()
  for path, group in found:
    parts = path.split("/")
    match = re.fullmatch(r"(conv2d|batch_normalization)(?:_(\d+))?", parts[-2])
    if not match:
      raise WeightsError(f"{where}: layer at {path} is neither a Conv2D nor "
                         "a BatchNormalization (and the file names no layers)")
    parents.add("/".join(parts[:-2]))
    by_class[match[1]][int(match[2] or 0)] = group
  if len(parents) > 1:
    raise WeightsError(f"{where}: the file names no layers and holds several "
                       f"models ({', '.join(sorted(parents))})")
  convs = by_class["conv2d"]
  blocks = (len(convs) - 1 - 4) // 3  # stem; one projection per stage
  stage_sizes = _stage_sizes_for(blocks)
  order = _keras_order(stage_sizes) if stage_sizes else []
  layers: LayerWeights = {}
  for suffix, cls in (("conv", "conv2d"), ("bn", "batch_normalization")):
    groups = by_class[cls]
    if sorted(groups) != list(range(len(order))):
      raise WeightsError(f"{where}: the file names no layers and its "
                         f"{len(groups)} {cls} layers do not form a known "
                         "ResNet")
    for i, stem in enumerate(order):
      layers[f"{stem}_{suffix}"] = [(None, a) for a in _numbered(groups[i])]
  return layers


def _stage_sizes_for(blocks: int) -> tuple[int, ...] | None:
  for stage_sizes in MODELS.values():
    if sum(stage_sizes) == blocks:
      return stage_sizes
  return None


def read_keras_weights(path: str) -> tuple[LayerWeights, str]:
  """All weights of a Keras file, by layer name, and the file's layout."""
  where = str(path)
  if not os.path.exists(path):
    raise WeightsError(f"{where}: no such file")
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        if "model.weights.h5" not in archive.namelist():
          raise WeightsError(f"{where}: zip archive without model.weights.h5 "
                             "(not a .keras file)")
        data = io.BytesIO(archive.read("model.weights.h5"))
      with h5py.File(data, "r") as h5:
        return _read_keras3(h5, where), "keras_zip"
    with h5py.File(path, "r") as h5:
      if _has_attr_list(h5, "layer_names"):
        return _read_legacy(h5, where), "legacy"
      if "model_weights" in h5 and _has_attr_list(h5["model_weights"],
                                                  "layer_names"):
        return _read_legacy(h5["model_weights"], where), "model_weights"
      if "layers" in h5 and isinstance(h5["layers"], h5py.Group):
        return _read_keras3(h5, where), "keras3"
      raise WeightsError(f"{where}: HDF5 file without Keras weights (no "
                         "layer_names attribute, model_weights or layers "
                         "group)")
  except WeightsError:
    raise
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
    reason = " ".join(str(e).split()) or type(e).__name__
    raise WeightsError(f"{where}: not a readable Keras weight file "
                       f"({reason})") from None
