"""Reading Keras weight files of every layout, without Keras.

The files are written here from a tiny ResNet's Keras-named weights, as
Keras writes each layout; files written by Keras itself are read in
test_pretrained.py.
"""

import functools
import io
import zipfile

import h5py
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mnist_resnet.core.errors import WeightsError
from mnist_resnet.model import keras_h5
from mnist_resnet.model import resnet


def write_legacy_h5(path, layers, *, under: str | None = None) -> None:
  """Writes `layers` like Keras 2's `save_weights_to_hdf5_group`.

  `layers` maps a layer name to its (weight name, array) pairs; `under`
  puts everything in a subgroup, as `model.save("x.h5")` does.
  """
  with h5py.File(path, "w") as f:
    root = f.create_group(under) if under else f
    root.attrs["layer_names"] = [n.encode("utf8") for n in layers]
    root.attrs["backend"] = b"tensorflow"
    root.attrs["keras_version"] = b"2.13.1"
    for name in sorted(layers):
      group = root.create_group(name)
      names = [w.encode("utf8") for w, _ in layers[name]]
      group.attrs["weight_names"] = names
      for weight_name, value in zip(names, (v for _, v in layers[name])):
        dataset = group.create_dataset(weight_name.decode(), value.shape,
                                       dtype=value.dtype)
        dataset[...] = value


def write_keras3_h5(target, layers, *, named: bool = True,
                    bfloat16: tuple[str, ...] = ()) -> None:
  """Writes `layers` like Keras 3's `save_weights("x.weights.h5")`.

  Groups are numbered per class in `layers`' order, which for
  `tiny_keras_layers` is Keras's own; `named=False` leaves out the `name`
  attributes, as Keras did before storing them; layers in `bfloat16` are
  stored as Keras 3 stores that dtype.
  """
  counts = {"conv2d": 0, "batch_normalization": 0}
  with h5py.File(target, "w") as f:
    for name, weights in layers.items():
      if not weights:
        continue
      cls = "conv2d" if name.endswith("_conv") else "batch_normalization"
      suffix = f"_{counts[cls]}" if counts[cls] else ""
      counts[cls] += 1
      group = f.create_group(f"layers/{cls}{suffix}/vars")
      if named:
        group.attrs["name"] = name
      for j, (_, value) in enumerate(weights):
        if name in bfloat16:
          group[str(j)] = value.astype(ml_dtypes.bfloat16).view("V2")
          group[str(j)].attrs["dtype"] = "bfloat16"
        else:
          group[str(j)] = value


@functools.lru_cache(maxsize=None)
def tiny_abstract():
  model = resnet.create_model("resnet_tiny")
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))


def _keras_order_key(name: str) -> tuple:
  """Keras's layer order: the projection (`_0_`) after the 3x3 conv (`_2_`)."""
  parts = name.split("_")
  if len(parts) == 2:  # conv1_conv, conv1_bn
    return (0,)
  stage, block, index = parts[0], parts[1], parts[2]
  return (1, stage, block, {"1": 1, "2": 2, "0": 3, "3": 4}[index])


def tiny_keras_layers(seed: int = 0) -> dict[str, list[tuple[str, np.ndarray]]]:
  """Keras-named weights of the right shapes for the tiny model, every layer
  (with weights or not) in Keras's order."""
  rng = np.random.default_rng(seed)
  abstract = tiny_abstract()
  params = abstract["params"]["backbone"]
  stats = abstract["batch_stats"]["backbone"]
  layers = {"input_layer": [], "conv1_pad": []}
  for name in sorted(params, key=lambda n: (_keras_order_key(n),
                                            not n.endswith("_conv"))):
    module = params[name]
    if name.endswith("_conv"):
      leaves = [("kernel", module["kernel"]), ("bias", module["bias"])]
    else:
      leaves = [("gamma", module["scale"]), ("beta", module["bias"]),
                ("moving_mean", stats[name]["mean"]),
                ("moving_variance", stats[name]["var"])]
    layers[name] = [(f"{name}/{k}:0", rng.uniform(0.1, 1, v.shape).astype(
        np.float32)) for k, v in leaves]
  layers["avg_pool"] = []
  return layers


def assert_same_arrays(found, layers) -> None:
  """`found` (LayerWeights) holds `layers`' arrays, layer by layer."""
  assert sorted(found) == sorted(n for n, w in layers.items() if w)
  for name, weights in found.items():
    for (_, a), (_, b) in zip(weights, layers[name], strict=True):
      np.testing.assert_array_equal(a, b, err_msg=name)


def write_layout(path, layout: str, layers) -> None:
  if layout == "legacy":
    write_legacy_h5(path, layers)
  elif layout == "model_weights":
    write_legacy_h5(path, layers, under="model_weights")
  elif layout in ("keras3", "keras3_unnamed"):
    write_keras3_h5(path, layers, named=layout == "keras3")
  else:
    data = io.BytesIO()
    write_keras3_h5(data, layers)
    with zipfile.ZipFile(path, "w") as archive:
      archive.writestr("config.json", "{}")
      archive.writestr("model.weights.h5", data.getvalue())


@pytest.mark.parametrize("layout", ["legacy", "model_weights", "keras3",
                                    "keras3_unnamed", "keras_zip"])
def test_every_layout_reads_every_weight(tmp_path, layout):
  layers = tiny_keras_layers()
  path = tmp_path / "tiny.weights"
  write_layout(path, layout, layers)
  found, found_layout = keras_h5.read_keras_weights(path)
  assert found_layout == layout.replace("_unnamed", "")
  assert_same_arrays(found, layers)
  names = {n for weights in found.values() for n, _ in weights}
  if layout in ("legacy", "model_weights"):
    # Layer prefix and ':0' dropped: what `load_keras_weights` matches on.
    assert names == {"kernel", "bias", "gamma", "beta", "moving_mean",
                     "moving_variance"}
  else:
    assert names == {None}


def test_legacy_chunked_layer_names(tmp_path):
  """Keras splits long name lists into `layer_names0`, `layer_names1`..."""
  layers = tiny_keras_layers()
  path = tmp_path / "chunked.h5"
  write_legacy_h5(path, layers)
  with h5py.File(path, "a") as f:
    names = list(f.attrs["layer_names"])
    del f.attrs["layer_names"]
    f.attrs["layer_names0"] = names[:5]
    f.attrs["layer_names1"] = names[5:]
  found, layout = keras_h5.read_keras_weights(path)
  assert layout == "legacy"
  assert_same_arrays(found, layers)


def test_keras3_skips_optimizer_and_reads_bfloat16(tmp_path):
  """A compiled model's `.keras` also stores optimizer variables."""
  layers = tiny_keras_layers()
  path = tmp_path / "tiny.weights.h5"
  write_keras3_h5(path, layers, bfloat16=("conv1_conv",))
  with h5py.File(path, "a") as f:
    optimizer = f.create_group("optimizer/vars")
    optimizer.attrs["name"] = "adam"
    optimizer["0"] = np.zeros((), np.int64)
    optimizer["1"] = np.zeros((7, 7), np.float32)
  found, _ = keras_h5.read_keras_weights(path)
  assert "adam" not in found
  kernel = found["conv1_conv"][0][1]
  assert kernel.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(
      kernel, layers["conv1_conv"][0][1].astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(found["conv4_block1_0_bn"][2][1],
                                layers["conv4_block1_0_bn"][2][1])


def test_keras3_unnamed_wrong_structure(tmp_path):
  path = tmp_path / "bad.weights.h5"
  write_keras3_h5(path, tiny_keras_layers(), named=False)
  with h5py.File(path, "a") as f:
    del f["layers/conv2d_7"]
  with pytest.raises(WeightsError, match="16 conv2d layers"):
    keras_h5.read_keras_weights(path)


def test_keras3_unnamed_foreign_layer(tmp_path):
  path = tmp_path / "dense.weights.h5"
  with h5py.File(path, "w") as f:
    f["layers/dense/vars/0"] = np.zeros((4, 2), np.float32)
  with pytest.raises(WeightsError,
                     match="layer at layers/dense/vars is neither"):
    keras_h5.read_keras_weights(path)


@pytest.mark.parametrize("content", [b"not hdf5 at all\n", b""])
def test_unreadable_file(tmp_path, content):
  path = tmp_path / "weights.h5"
  path.write_bytes(content)
  with pytest.raises(WeightsError, match="not a readable Keras weight file"):
    keras_h5.read_keras_weights(path)


def test_missing_file_foreign_hdf5_and_zip(tmp_path):
  with pytest.raises(WeightsError, match="no such file"):
    keras_h5.read_keras_weights(tmp_path / "nope.h5")
  path = tmp_path / "other.h5"
  with h5py.File(path, "w") as f:
    f["x"] = np.zeros(3)
  with pytest.raises(WeightsError, match="without Keras weights"):
    keras_h5.read_keras_weights(path)
  archive_path = tmp_path / "other.zip"
  with zipfile.ZipFile(archive_path, "w") as archive:
    archive.writestr("x.txt", "x")
  with pytest.raises(WeightsError, match="without model.weights.h5"):
    keras_h5.read_keras_weights(archive_path)
