"""Pretrained weights -> Flax: every layout numerically equal to Keras,
name matching, converted directories, where the weights come from.

One randomly initialised Keras ResNet50 (random kernels, biases, gamma, beta,
moving mean and moving variance) is written in each layout; from each file
the Flax model must load exactly Keras's weights, and loaded from the legacy
file it must compute Keras's features.
"""

import functools
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_keras_h5 import tiny_abstract
from test_keras_h5 import tiny_keras_layers
from test_keras_h5 import write_keras3_h5
from test_keras_h5 import write_legacy_h5

from mnist_resnet.core import tf_host
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.core.errors import WeightsError
from mnist_resnet.model import keras_h5
from mnist_resnet.model import preprocess
from mnist_resnet.model import pretrained
from mnist_resnet.model import resnet

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYOUTS = ("legacy", "model_weights", "keras3", "keras3_unnamed", "keras_zip")


def randomize_keras_model(model, seed: int = 0) -> None:
  """Random weights everywhere, including BN statistics (variance > 0)."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if type(layer).__name__ == "BatchNormalization":
      c = layer.gamma.shape[0]
      layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                         rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)])
    elif type(layer).__name__ == "Conv2D":
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0, 0.05, bias.shape)])


def keras_layer_weights(model) -> dict[str, list[tuple[str, np.ndarray]]]:
  """Every layer (with weights or not), as Keras 2 named its weights."""
  return {layer.name: [(f"{layer.name}/{w.name}:0", np.asarray(w))
                       for w in layer.weights] for layer in model.layers}


def strip_layer_names(path) -> None:
  """Makes a Keras 3 .weights.h5 look like one from before layer names."""
  with h5py.File(path, "a") as f:
    def visit(name, obj):
      if isinstance(obj, h5py.Group) and name.endswith("vars"):
        if "name" in obj.attrs:
          del obj.attrs["name"]
    f.visititems(visit)


@pytest.fixture(scope="module")
def keras_model():
  keras = tf_host.import_keras()
  keras.utils.set_random_seed(0)
  model = keras.applications.ResNet50(
      weights=None, include_top=False, pooling="avg",
      input_shape=(None, None, 3))
  randomize_keras_model(model)
  return model


@pytest.fixture(scope="module")
def weight_files(keras_model, tmp_path_factory):
  directory = tmp_path_factory.mktemp("keras_weights")
  files = {
      "legacy": directory / "legacy.h5",
      "model_weights": directory / "saved_model.h5",
      "keras3": directory / "k3.weights.h5",
      "keras3_unnamed": directory / "k3_unnamed.weights.h5",
      "keras_zip": directory / "model.keras",
  }
  write_legacy_h5(files["legacy"], keras_layer_weights(keras_model))
  keras_model.save(files["model_weights"])
  keras_model.save_weights(files["keras3"])
  shutil.copy(files["keras3"], files["keras3_unnamed"])
  strip_layer_names(files["keras3_unnamed"])
  keras_model.save(files["keras_zip"])
  yield files
  shutil.rmtree(directory, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def flax_resnet50():
  model = resnet.create_model("resnet50")
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  features = jax.jit(lambda v, x: model.apply(
      v, x, train=False, method=resnet.ResNet.features))
  train_features = jax.jit(lambda v, x: model.apply(
      v, x, train=True, method=resnet.ResNet.features,
      mutable=["batch_stats"]))
  return variables, features, train_features


def backbone(variables):
  return {k: {"backbone": v["backbone"]} for k, v in variables.items()}


def rel_diff(ours, theirs) -> float:
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def caffe_batch(keras, batch: int, size: int, seed: int) -> np.ndarray:
  rgb = np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3))
  return keras.applications.resnet.preprocess_input(rgb.astype(np.float32))


def test_legacy_reader_and_keras_agree_on_the_weights(keras_model,
                                                      weight_files):
  """Our legacy file is one Keras itself loads, by name, back to the same."""
  keras = tf_host.import_keras()
  clone = keras.applications.ResNet50(
      weights=None, include_top=False, pooling="avg",
      input_shape=(None, None, 3))
  clone.load_weights(str(weight_files["legacy"]), by_name=True)
  for a, b in zip(clone.weights, keras_model.weights):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_keras_weights_exactly(layout, keras_model,
                                                  weight_files):
  abstract, _, _ = flax_resnet50()
  _, found_layout = keras_h5.read_keras_weights(weight_files[layout])
  assert found_layout == layout.replace("_unnamed", "")
  loaded = pretrained.load_keras_weights(weight_files[layout], abstract)
  assert loaded["params"]["head"] is abstract["params"]["head"]
  params = loaded["params"]["backbone"]
  stats = loaded["batch_stats"]["backbone"]
  for name, module in params.items():
    keras_weights = keras_model.get_layer(name).get_weights()
    if name.endswith("_conv"):
      ours = [module["kernel"], module["bias"]]
    else:
      ours = [module["scale"], module["bias"], stats[name]["mean"],
              stats[name]["var"]]
    for a, b in zip(ours, keras_weights, strict=True):
      assert a.dtype == jnp.float32
      np.testing.assert_array_equal(a, b, err_msg=name)


def test_features_equal_keras_in_inference(keras_model, weight_files):
  """Keras's own model and ours, loaded from the legacy file (the layout of
  Keras's ImageNet downloads), compute the same features at 32x32, at the
  fine-tuning resolution 224x224 and on preprocessed digits. The other
  layouts load bit-identical weights
  (test_every_layout_loads_keras_weights_exactly), hence the same features;
  test_convert.py runs Keras on each of them."""
  keras = tf_host.import_keras()
  abstract, features, _ = flax_resnet50()
  variables = backbone(pretrained.load_keras_weights(weight_files["legacy"],
                                                     abstract))
  mnist = np.zeros((4, 28, 28), np.uint8)
  mnist[:, 5:23, 12:16] = np.random.default_rng(1).integers(
      100, 256, (4, 18, 4))
  batches = [caffe_batch(keras, 4, 32, seed=2),
             caffe_batch(keras, 2, 224, seed=3),
             np.asarray(preprocess.to_model_input(jnp.asarray(mnist),
                                                  image_size=32))]
  with jax.default_matmul_precision("highest"):
    for x in batches:
      expected = keras_model(x, training=False)
      assert rel_diff(features(variables, x), expected) <= 1e-5, x.shape


def test_comparison_detects_one_wrong_statistic(keras_model, weight_files):
  """The 1e-5 check is sharp: 1% off one BN variance deep inside fails it."""
  keras = tf_host.import_keras()
  abstract, features, _ = flax_resnet50()
  variables = backbone(pretrained.load_keras_weights(weight_files["legacy"],
                                                     abstract))
  stats = variables["batch_stats"]["backbone"]["conv4_block3_2_bn"]
  stats["var"] = stats["var"] * 1.01
  x = caffe_batch(keras, 4, 32, seed=2)
  assert rel_diff(features(variables, x), keras_model(x, training=False)) > (
      1e-4)


def test_training_mode_equals_keras(keras_model, weight_files):
  keras = tf_host.import_keras()
  abstract, _, train_features = flax_resnet50()
  variables = backbone(pretrained.load_keras_weights(weight_files["legacy"],
                                                     abstract))
  # BN over a 1x1 map of a few examples is float32 noise, for Keras and for
  # Flax alike (both ~1e-4 from a float64 reference at 32x32, batch 8); a
  # 96x96 batch of 2 gives statistics over 9 positions at the last stage.
  x = caffe_batch(keras, 2, 96, seed=4)
  saved = keras_model.get_weights()
  try:
    expected = np.asarray(keras_model(x, training=True))
    moved = {layer.name: (np.asarray(layer.moving_mean),
                          np.asarray(layer.moving_variance))
             for layer in keras_model.layers
             if type(layer).__name__ == "BatchNormalization"}
  finally:
    keras_model.set_weights(saved)
  with jax.default_matmul_precision("highest"):
    out, updates = train_features(variables, x)
  assert rel_diff(out, expected) <= 1e-4
  # Same momentum convention: the running statistics move identically.
  for name, (mean, var) in moved.items():
    new = updates["batch_stats"]["backbone"][name]
    assert rel_diff(new["mean"], mean) <= 1e-4, name
    assert rel_diff(new["var"], var) <= 1e-4, name


# Faulty files: written from a tiny model's Flax variables, no Keras needed.


def test_tiny_legacy_round_trip(tmp_path):
  layers = tiny_keras_layers()
  path = tmp_path / "tiny.h5"
  write_legacy_h5(path, layers)
  loaded = pretrained.load_keras_weights(path, tiny_abstract())
  np.testing.assert_array_equal(
      loaded["batch_stats"]["backbone"]["conv3_block1_0_bn"]["var"],
      layers["conv3_block1_0_bn"][3][1])
  # Weight order inside a layer follows the names, not the file order.
  layers["conv1_bn"] = layers["conv1_bn"][::-1]
  write_legacy_h5(path, layers)
  again = pretrained.load_keras_weights(path, tiny_abstract())
  np.testing.assert_array_equal(
      again["params"]["backbone"]["conv1_bn"]["scale"],
      loaded["params"]["backbone"]["conv1_bn"]["scale"])


def expect_error(tmp_path, layers, pattern: str) -> str:
  path = tmp_path / "weights.h5"
  write_legacy_h5(path, layers)
  with pytest.raises(WeightsError, match=pattern) as info:
    pretrained.load_keras_weights(path, tiny_abstract())
  message = str(info.value)
  assert "\n" not in message and message.startswith(str(path))
  return message


def test_missing_layer(tmp_path):
  layers = tiny_keras_layers()
  del layers["conv4_block1_2_conv"]
  expect_error(tmp_path, layers,
               r"layer conv4_block1_2_conv is missing from the file")


def test_extra_layer(tmp_path):
  layers = tiny_keras_layers()
  layers["predictions"] = [("predictions/kernel:0",
                            np.zeros((256, 1000), np.float32))]
  expect_error(tmp_path, layers,
               r"layer predictions \(256,1000\) has no counterpart")


def test_wrong_kernel_shape(tmp_path):
  layers = tiny_keras_layers()
  layers["conv3_block1_2_conv"][0] = ("conv3_block1_2_conv/kernel:0",
                                      np.zeros((3, 3, 16, 8), np.float32))
  message = expect_error(tmp_path, layers, "conv3_block1_2_conv kernel")
  assert message.endswith(": layer conv3_block1_2_conv kernel has shape "
                          "(3,3,16,8), model expects (3,3,16,16)")


def test_wrong_weight_count(tmp_path):
  layers = tiny_keras_layers()
  layers["conv2_block1_1_bn"] = layers["conv2_block1_1_bn"][:2]
  expect_error(tmp_path, layers,
               r"layer conv2_block1_1_bn has 2 weights \(gamma, beta\), "
               r"model expects 4")


def test_imagenet_download_failure_is_one_line(monkeypatch):
  calls = []

  def get_file(*args, **kwargs):
    calls.append((args, kwargs))
    raise Exception("URL fetch failure on https://...: None -- [Errno -3]\n"
                    "Temporary failure in name resolution")

  fake = types.SimpleNamespace(utils=types.SimpleNamespace(get_file=get_file))
  monkeypatch.setattr(tf_host, "import_keras", lambda: fake)
  with pytest.raises(WeightsError) as info:
    pretrained.imagenet_weights_path("resnet50")
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("could not download Keras's ImageNet ResNet50 "
                            "weights (URL fetch failure")
  assert message.endswith(
      "pass a local file with --config.pretrained_weights=PATH (the file "
      "Keras caches as ~/.keras/models/"
      "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5)")
  (args, kwargs), = calls
  assert args == ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                  "https://storage.googleapis.com/tensorflow/keras-"
                  "applications/resnet/"
                  "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
  assert kwargs == {"cache_subdir": "models",
                    "file_hash": "4d473c1dd8becc155b73f8504c6f6626"}


# Run with KERAS_HOME and the proxies set before Keras is imported (Keras
# reads KERAS_HOME once, at import). argv: the md5 of the cached file.
_OFFLINE_CACHE_SCRIPT = """
import json, sys
from mnist_resnet.model import pretrained
from mnist_resnet.core.errors import WeightsError

def attempt():
  print("-- attempt", flush=True)
  try:
    return {"path": pretrained.imagenet_weights_path("resnet50")}
  except WeightsError as e:
    return {"error": str(e)}

pretrained._IMAGENET_NOTOP_MD5["resnet50"] = sys.argv[1]
cached = attempt()
# The same file under another published hash: Keras must fetch it again.
pretrained._IMAGENET_NOTOP_MD5["resnet50"] = "0" * 32
stale = attempt()
print(json.dumps([cached, stale]))
"""


def test_imagenet_weights_found_offline_in_keras_home(tmp_path):
  """docs/training.md: a Keras weight file in $KERAS_HOME/models is used
  offline."""
  name = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
  keras_home = tmp_path / "keras_home"
  (keras_home / "models").mkdir(parents=True)
  cached = keras_home / "models" / name
  cached.write_bytes(b"\x89HDF\r\n\x1a\n stand-in for Keras's ImageNet file")
  home = tmp_path / "home"  # An empty ~/.keras: only KERAS_HOME has it.
  home.mkdir()
  env = {k: v for k, v in os.environ.items()
         if k.lower() not in ("no_proxy", "keras_home")}
  closed = "http://127.0.0.1:9"  # Discard port: nothing listens.
  env.update({"KERAS_HOME": str(keras_home), "HOME": str(home),
              "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu",
              "TF_CPP_MIN_LOG_LEVEL": "2",
              **{k: closed for k in ("HTTPS_PROXY", "https_proxy",
                                     "HTTP_PROXY", "http_proxy",
                                     "ALL_PROXY", "all_proxy")}})
  md5 = hashlib.md5(cached.read_bytes()).hexdigest()
  result = subprocess.run(
      [sys.executable, "-c", _OFFLINE_CACHE_SCRIPT, md5], cwd=tmp_path,
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  cached_result, stale_result = json.loads(result.stdout.splitlines()[-1])
  # Found where Keras caches it, without a download.
  assert cached_result == {"path": str(cached)}, result.stdout
  first_attempt = result.stdout.split("-- attempt")[1]
  assert "Downloading" not in first_attempt, result.stdout
  # Control: a file that does not match the hash is not used, and the
  # download it falls back to fails, since the network is unreachable.
  assert "error" in stale_result, stale_result
  assert stale_result["error"].startswith(
      "could not download Keras's ImageNet ResNet50 weights (URL fetch "
      "failure"), stale_result


def test_imagenet_hashes_are_keras_own():
  from keras.src.applications import resnet
  for name, md5 in pretrained._IMAGENET_NOTOP_MD5.items():
    assert resnet.WEIGHTS_HASHES[name][1] == md5


def test_no_imagenet_weights_for_tiny():
  with pytest.raises(ConfigError, match="resnet_tiny"):
    pretrained.imagenet_weights_path("resnet_tiny")


def test_bfloat16_weights_load_as_float32(tmp_path):
  layers = tiny_keras_layers()
  path = tmp_path / "tiny.weights.h5"
  write_keras3_h5(path, layers, bfloat16=("conv1_conv",))
  loaded = pretrained.load_keras_weights(path, tiny_abstract())
  kernel = loaded["params"]["backbone"]["conv1_conv"]["kernel"]
  assert kernel.dtype == jnp.float32
  np.testing.assert_array_equal(kernel, layers["conv1_conv"][0][1].astype(
      jnp.bfloat16).astype(np.float32))


def test_resolve_weights(tmp_path, monkeypatch):
  path = tmp_path / "w.h5"
  path.write_bytes(b"")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert pretrained.resolve_weights("~/w.h5", "resnet50") == str(path)
  assert pretrained.resolve_weights(str(tmp_path), "resnet50") == str(
      tmp_path)
  with pytest.raises(WeightsError) as info:
    pretrained.resolve_weights("~/nope.h5", "resnet50")
  assert str(info.value) == ("config.pretrained_weights='~/nope.h5': no such "
                             "file or directory")
  # Empty: Keras's ImageNet file, through Keras's cache.
  fake = types.SimpleNamespace(utils=types.SimpleNamespace(
      get_file=lambda name, *args, **kwargs: f"/cache/{name}"))
  monkeypatch.setattr(tf_host, "import_keras", lambda: fake)
  assert pretrained.resolve_weights("", "resnet101") == (
      "/cache/resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5")
  with pytest.raises(ConfigError, match="resnet_tiny"):
    pretrained.resolve_weights("", "resnet_tiny")


def test_save_restore_round_trip_into_empty_dir(tmp_path):
  variables = {"params": {"backbone": {"conv1_conv": {
      "kernel": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3),
      "bias": np.ones(3, np.float32)}}},
               "batch_stats": {"backbone": {}}}
  variables["batch_stats"]["backbone"]["conv1_bn"] = {
      "mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}
  out = tmp_path / "empty"
  out.mkdir()
  pretrained.save_variables(variables, out)
  restored = pretrained.restore_variables(out)
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  assert isinstance(restored["params"]["backbone"]["conv1_conv"]["kernel"],
                    np.ndarray)
  with pytest.raises(ConfigError, match="already exists and is not empty"):
    pretrained.save_variables(variables, out)
  with pytest.raises(WeightsError, match="no converted checkpoint there"):
    pretrained.restore_variables(tmp_path / "nope")


def test_require_new_directory(tmp_path):
  assert pretrained.require_new_directory(tmp_path / "new") == str(
      tmp_path / "new")
  assert pretrained.require_new_directory(tmp_path) == str(tmp_path)
  (tmp_path / "file").write_text("x")
  for taken in (tmp_path, tmp_path / "file"):
    with pytest.raises(ConfigError) as info:
      pretrained.require_new_directory(taken)
    assert str(info.value) == (f"--out {taken} already exists and is not "
                               "empty; refusing to overwrite it")


def tiny_variables(model=None):
  model = model or resnet.create_model("resnet_tiny")
  return model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)),
                    train=False)


def converted(variables, out) -> None:
  pretrained.save_variables(backbone(variables), out)


def test_load_backbone_from_a_keras_file_and_a_converted_directory(tmp_path):
  layers = tiny_keras_layers()
  path = tmp_path / "tiny.h5"
  write_legacy_h5(path, layers)
  fresh = tiny_variables()
  from_file = pretrained.load_backbone(str(path), fresh, "resnet_tiny")
  np.testing.assert_array_equal(
      from_file["batch_stats"]["backbone"]["conv2_block1_3_bn"]["var"],
      layers["conv2_block1_3_bn"][3][1])
  jax.tree.map(np.testing.assert_array_equal, from_file["params"]["head"],
               fresh["params"]["head"])

  out = tmp_path / "converted"
  converted(from_file, out)
  other = tiny_variables(resnet.create_model("resnet_tiny", num_classes=3))
  from_dir = pretrained.load_backbone(str(out), other, "resnet_tiny")
  jax.tree.map(np.testing.assert_array_equal,
               backbone(from_dir), backbone(from_file))
  jax.tree.map(np.testing.assert_array_equal, from_dir["params"]["head"],
               other["params"]["head"])
  assert sorted(from_dir) == ["batch_stats", "params"]


def test_converted_directory_of_another_model_is_refused(tmp_path):
  # One more block in stage 4: another tree of modules.
  deeper = resnet.ResNet(stage_sizes=(1, 1, 2, 1), widths=(8, 16, 32, 64),
                         stem_width=16)
  converted(tiny_variables(deeper), tmp_path / "deeper")
  with pytest.raises(WeightsError) as info:
    pretrained.load_backbone(str(tmp_path / "deeper"), tiny_variables(),
                             "resnet_tiny")
  assert str(info.value) == (f"{tmp_path / 'deeper'}: converted weights do "
                             "not fit resnet_tiny (params/backbone differs)")


def test_converted_directory_with_a_wrong_shape_is_refused(tmp_path):
  variables = jax.device_get(tiny_variables())
  stats = variables["batch_stats"]["backbone"]["conv3_block1_0_bn"]
  stats["var"] = np.ones(7, np.float32)
  converted(variables, tmp_path / "bad")
  with pytest.raises(WeightsError) as info:
    pretrained.load_backbone(str(tmp_path / "bad"), tiny_variables(),
                             "resnet_tiny")
  assert str(info.value) == (
      f"{tmp_path / 'bad'}: batch_stats/backbone['conv3_block1_0_bn']['var'] "
      "has shape (7,), resnet_tiny expects (64,)")


def test_converted_directory_without_batch_stats_is_refused(tmp_path):
  variables = backbone(tiny_variables())
  del variables["batch_stats"]
  pretrained.save_variables(variables, tmp_path / "params_only")
  with pytest.raises(WeightsError, match=r"\(batch_stats/backbone differs\)"):
    pretrained.load_backbone(str(tmp_path / "params_only"), tiny_variables(),
                             "resnet_tiny")
