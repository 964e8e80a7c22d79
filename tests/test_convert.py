"""The conversion CLI: Keras file -> orbax checkpoint, checked against Keras."""

import json
import pathlib
import subprocess
import sys
import types

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_resnet.commands import convert
from mnist_resnet.core import tf_host
from mnist_resnet.model import keras_parity
from mnist_resnet.model import pretrained
from mnist_resnet.model import resnet

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_legacy_h5(path, model) -> None:
  """Root `layer_names` layout with ':0' names, as Keras 2 wrote it."""
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.13.1"
    for layer in model.layers:
      group = f.create_group(layer.name)
      names = [f"{layer.name}/{w.name}:0" for w in layer.weights]
      group.attrs["weight_names"] = [n.encode() for n in names]
      for name, weight in zip(names, layer.weights):
        group[name] = np.asarray(weight)


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
  keras = tf_host.import_keras()
  keras.utils.set_random_seed(1)
  model = keras.applications.ResNet50(weights=None, include_top=False,
                                      pooling="avg", input_shape=(32, 32, 3))
  rng = np.random.default_rng(1)
  for layer in model.layers:
    if type(layer).__name__ == "BatchNormalization":
      c = layer.gamma.shape[0]
      layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                         rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)])
  directory = tmp_path_factory.mktemp("convert_inputs")
  files = {"legacy": directory / "imagenet_like.h5",
           "model_weights": directory / "full_model.h5",
           "keras3": directory / "resnet.weights.h5",
           "keras_zip": directory / "resnet.keras"}
  write_legacy_h5(files["legacy"], model)
  model.save(files["model_weights"])
  model.save_weights(files["keras3"])
  model.save(files["keras_zip"])
  return files


def run_main(capsys, *args: str) -> tuple[int, list[str], list[str]]:
  code = convert.main(list(args))
  captured = capsys.readouterr()
  return code, captured.out.splitlines(), captured.err.splitlines()


def verify_at_32px_only(monkeypatch) -> None:
  """Keeps verify's 32x32 checks: the 224x224 one costs most of its time."""
  monkeypatch.setattr(keras_parity, "_VERIFY_BATCHES", tuple(
      b for b in keras_parity._VERIFY_BATCHES if b[1] == 32))


# The full check, 224x224 included, runs on the layout of Keras's ImageNet
# downloads (what `--keras_weights=imagenet --verify` reads); the others run
# Keras's own loader for their layout and compare at 32x32 only.
FULL_VERIFY_LAYOUT = "legacy"


@pytest.mark.parametrize("layout", ["legacy", "model_weights", "keras3",
                                    "keras_zip"])
def test_convert_and_verify(layout, keras_files, tmp_path, capsys,
                            monkeypatch):
  full = layout == FULL_VERIFY_LAYOUT
  if not full:
    verify_at_32px_only(monkeypatch)
  out = tmp_path / "converted"
  code, stdout, _ = run_main(capsys, f"--keras_weights={keras_files[layout]}",
                             f"--out={out}", "--verify")
  report = json.loads(stdout[-1])
  print(stdout[-1])  # the figures, for -s runs
  assert code == 0, report
  assert report["layout"] == layout
  assert report["max_rel_diff"] <= 1e-5
  checks = {("random", 32), ("mnist", 32)}
  if full:
    assert report["sizes"] == [32, 224]
    checks.add(("random", 224))
  else:
    assert report["sizes"] == [32]
  assert {(c["input"], c["size"]) for c in report["checks"]} == checks

  # The checkpoint is the backbone, exactly what the loader produces.
  restored = pretrained.restore_variables(out)
  model = resnet.create_model("resnet50")
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  direct = pretrained.load_keras_weights(keras_files[layout], abstract)
  direct = {k: {"backbone": v["backbone"]} for k, v in direct.items()}
  assert jax.tree.structure(restored) == jax.tree.structure(direct)
  jax.tree.map(np.testing.assert_array_equal, restored, direct)


def test_verify_fails_on_one_wrong_statistic(keras_files, tmp_path, capsys,
                                             monkeypatch):
  """1% off one BN variance deep inside the checkpoint: exit code 1."""
  save = pretrained.save_variables

  def save_perturbed(variables, out_dir):
    stats = variables["batch_stats"]["backbone"]["conv4_block3_2_bn"]
    stats["var"] = stats["var"] * 1.01
    save(variables, out_dir)

  monkeypatch.setattr(pretrained, "save_variables", save_perturbed)
  verify_at_32px_only(monkeypatch)  # Already 10x over the tolerance there.
  code, stdout, _ = run_main(
      capsys, f"--keras_weights={keras_files['legacy']}",
      f"--out={tmp_path / 'converted'}", "--verify")
  report = json.loads(stdout[-1])
  assert code == 1, report
  assert report["max_rel_diff"] > 10 * keras_parity.VERIFY_TOLERANCE


def test_existing_out_is_refused_in_one_line(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  result = subprocess.run(
      [sys.executable, "-m", "mnist_resnet.convert",
       f"--keras_weights={tmp_path / 'missing.h5'}", f"--out={out}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0
  assert "already exists and is not empty" in result.stderr
  assert (out / "keep.txt").read_text() == "precious"


def test_bad_weight_file_is_one_line(tmp_path, capsys):
  bad = tmp_path / "bad.h5"
  bad.write_text("not a weight file")
  code, stdout, stderr = run_main(capsys, f"--keras_weights={bad}",
                                  f"--out={tmp_path / 'out'}")
  assert code == 2 and stdout == [] and len(stderr) == 1
  assert stderr[0].startswith(f"error: {bad}: not a readable Keras weight")
  assert not (tmp_path / "out").exists()


def test_unknown_model_is_refused_before_any_work(tmp_path, capsys):
  code, stdout, stderr = run_main(capsys, "--keras_weights=imagenet",
                                  f"--out={tmp_path / 'out'}",
                                  "--model=resnet18")
  assert code == 2 and stdout == [] and stderr == [
      f"error: unknown model 'resnet18'; known: {', '.join(resnet.MODELS)}"]
  assert not (tmp_path / "out").exists()


def test_verify_needs_a_keras_model(tmp_path, capsys):
  code, _, stderr = run_main(capsys, "--keras_weights=x.h5",
                             f"--out={tmp_path / 'out'}", "--model=resnet_tiny",
                             "--verify")
  assert code == 2 and len(stderr) == 1 and "resnet_tiny" in stderr[0]


def test_offline_imagenet_hint_names_the_convert_flag(tmp_path, capsys,
                                                      monkeypatch):
  """Offline, the message says how to give convert a local file: its own
  --keras_weights, not training's --config.pretrained_weights."""
  def no_network():
    raise OSError("URL fetch failure: Temporary failure in name resolution")
  monkeypatch.setattr(tf_host, "import_keras", lambda: types.SimpleNamespace(
      utils=types.SimpleNamespace(get_file=lambda *a, **k: no_network())))
  code, stdout, stderr = run_main(capsys, "--keras_weights=imagenet",
                                  f"--out={tmp_path / 'out'}")
  assert code == 2 and stdout == [] and len(stderr) == 1
  assert "pass a local file with --keras_weights=PATH (the file Keras " in (
      stderr[0])
  assert "pretrained_weights" not in stderr[0]
  assert not (tmp_path / "out").exists()
