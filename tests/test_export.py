"""The export CLI: the artifacts run without this project, and agree with it.

Each artifact is loaded in a fresh process that cannot import what its users
may not have: the jax artifact with jax and numpy alone (no Flax, no
TensorFlow, no mnist_resnet), the SavedModel with TensorFlow alone (no JAX).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO_ROOT
from mnist_resnet.data import idx
from mnist_resnet.data import mnist
from mnist_resnet.training import trained

BATCHES = (1, 37)
TOLERANCE = 1e-5

# Put first in a child's code: importing any of the top-level packages in
# `blocked` raises ImportError, as where they are not installed.
BLOCKER = textwrap.dedent("""\
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
      def __init__(self, blocked):
        self.blocked = set(blocked)

      def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
          raise ImportError(f"{name} is not available here")
        return None

    """)

LOAD_JAX_EXPORT = BLOCKER + textwrap.dedent("""\
    sys.meta_path.insert(0, Blocker(["flax", "mnist_resnet", "tensorflow"]))
    import json
    import jax
    import numpy as np

    artifact, images_path, out, batches = sys.argv[1:5]
    with open(artifact, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    images = np.load(images_path)
    np.savez(out, **{f"batch_{b}": np.asarray(exported.call(images[:b]))
                     for b in map(int, batches.split(","))})
    print(json.dumps({"platforms": list(exported.platforms),
                      "in_avals": [str(a) for a in exported.in_avals],
                      "out_avals": [str(a) for a in exported.out_avals]}))
    """)

LOAD_SAVED_MODEL = BLOCKER + textwrap.dedent("""\
    sys.meta_path.insert(0, Blocker(["jax", "jaxlib", "flax", "mnist_resnet"]))
    import json
    import numpy as np
    import tensorflow as tf

    path, images_path, out, batches = sys.argv[1:5]
    serve = tf.saved_model.load(path).signatures["serving_default"]
    images = np.load(images_path)
    np.savez(out, **{
        f"batch_{b}": serve(images=tf.constant(images[:b]))[
            "probabilities"].numpy()
        for b in map(int, batches.split(","))})
    _, inputs = serve.structured_input_signature
    print(json.dumps({
        "inputs": {k: [v.shape.as_list(), v.dtype.name]
                   for k, v in inputs.items()},
        "outputs": {k: [v.shape.as_list(), v.dtype.name]
                    for k, v in serve.structured_outputs.items()}}))
    """)


def child_env() -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
              XLA_FLAGS="--xla_force_host_platform_device_count=1")


def run_export(*args: str, accelerator_image: bool = False
               ) -> subprocess.CompletedProcess:
  """`python -m mnist_resnet.export ARGS`; with `accelerator_image`, as on
  an image without TensorFlow, Keras or Google Cloud's libraries
  (tests/accelerator_image.py)."""
  image = ([str(REPO_ROOT / "tests" / "accelerator_image.py")]
           if accelerator_image else [])
  return subprocess.run(
      [sys.executable, *image, "-m", "mnist_resnet.export", *args],
      cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True,
      timeout=300)


def run_loader(code: str, *args, cwd) -> dict:
  """Runs a loader script in a fresh process; its last stdout line (JSON)."""
  # cwd: not the checkout, whose mnist_resnet would be importable.
  result = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                          cwd=cwd, env=child_env(), capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.splitlines()[-1])


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def exported(trained_workdir, tmp_path_factory):
  """Both formats of the latest checkpoint, exported by the CLI."""
  out = tmp_path_factory.mktemp("export") / "exported"
  result = run_export(f"--workdir={trained_workdir}", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "read only" not in result.stderr  # Orbax's notes, by design.
  assert result.stdout.splitlines()[-1] == (
      f"wrote {out}: step 60 of {trained_workdir} as jax_export, "
      "saved_model for cpu, cuda, tpu")
  return out


@pytest.fixture(scope="module")
def digits(mnist_dir, tmp_path_factory):
  """Real test digits (enough for the largest batch), and their .npy."""
  paths = mnist.locate_files(mnist_dir, download=False)
  images = idx.read_idx(paths[mnist.TEST_IMAGES])[:max(BATCHES)]
  path = tmp_path_factory.mktemp("images") / "images.npy"
  np.save(path, images)
  return images, path


@pytest.fixture(scope="module")
def expected(trained_workdir, digits):
  """The probabilities of the model as this project runs it."""
  images, _ = digits
  logits = trained.load(trained_workdir, "latest").predict_logits(images)
  return softmax(logits.astype(np.float64))


def check_outputs(outputs, expected) -> None:
  for b in BATCHES:
    got = outputs[f"batch_{b}"]
    assert got.shape == (b, mnist.NUM_CLASSES) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected[:b], rtol=0, atol=TOLERANCE)


def test_manifest(exported, trained_workdir):
  manifest = json.loads((exported / "export.json").read_text())
  assert manifest["step"] == 60
  assert manifest["workdir"] == str(trained_workdir)
  assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
  assert manifest["formats"] == {"jax_export": "model.jax_export",
                                 "saved_model": "saved_model"}
  assert manifest["input"]["shape"] == ["batch", 28, 28]
  assert manifest["output"] == {**manifest["output"], "name": "probabilities",
                                "dtype": "float32", "shape": ["batch", 10]}
  assert set(manifest["versions"]) == {"jax", "tensorflow"}
  # Every file but the manifest, each with its digest.
  digests = {str(p.relative_to(exported)): hashlib.sha256(
      p.read_bytes()).hexdigest() for p in exported.rglob("*")
             if p.is_file() and p.name != "export.json"}
  assert manifest["sha256"] == digests
  assert {"model.jax_export", "saved_model/saved_model.pb"} <= set(digests)
  # Nothing of the staging directory is left beside the export.
  assert os.listdir(exported.parent) == [exported.name]


def test_jax_artifact_runs_without_flax(exported, digits, expected,
                                        tmp_path):
  out = tmp_path / "outputs.npz"
  info = run_loader(LOAD_JAX_EXPORT, exported / "model.jax_export",
                    digits[1], out, ",".join(map(str, BATCHES)),
                    cwd=tmp_path)
  assert info == {"platforms": ["cpu", "cuda", "tpu"],
                  "in_avals": ["uint8[batch,28,28]"],
                  "out_avals": ["float32[batch,10]"]}
  check_outputs(np.load(out), expected)


def test_saved_model_runs_without_jax(exported, digits, expected,
                                      tmp_path):
  out = tmp_path / "outputs.npz"
  info = run_loader(LOAD_SAVED_MODEL, exported / "saved_model",
                    digits[1], out, ",".join(map(str, BATCHES)),
                    cwd=tmp_path)
  assert info == {"inputs": {"images": [[None, 28, 28], "uint8"]},
                  "outputs": {"probabilities": [[None, 10], "float32"]}}
  check_outputs(np.load(out), expected)


def test_jax_export_alone_needs_no_tensorflow(trained_workdir, tmp_path):
  """--formats=jax_export as on an accelerator image, where TensorFlow,
  Keras and Google Cloud's libraries cannot be imported; a step by number;
  an --out that exists, empty."""
  out = tmp_path / "jax_only"
  out.mkdir()
  result = run_export(
      f"--workdir={trained_workdir}", "--step=20", f"--out={out}",
      "--formats=jax_export", accelerator_image=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["export.json", "model.jax_export"]
  assert os.listdir(tmp_path) == ["jax_only"]
  manifest = json.loads((out / "export.json").read_text())
  assert manifest["step"] == 20
  assert manifest["formats"] == {"jax_export": "model.jax_export"}
  assert manifest["versions"] == {"jax": manifest["versions"]["jax"]}


def _bad_inputs(workdir, tmp_path):
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "mine.txt").write_text("a user's file")
  new = tmp_path / "new"
  return {
      "out not empty": ([f"--workdir={workdir}", f"--out={taken}"],
                        f"error: --out {taken} already exists and is not "
                        "empty; refusing to overwrite it"),
      "no workdir": ([f"--workdir={tmp_path / 'nowhere'}", f"--out={new}"],
                     f"error: {tmp_path / 'nowhere'}: no such workdir"),
      "no such step": ([f"--workdir={workdir}", "--step=7", f"--out={new}"],
                       f"error: {workdir / 'checkpoints'} holds no checkpoint "
                       "of step 7; it holds steps 20, 40, 60"),
      "unknown format": ([f"--workdir={workdir}", "--formats=onnx",
                          f"--out={new}"],
                         "error: --formats=onnx: must be one or more of "
                         "jax_export, saved_model"),
  }


@pytest.mark.parametrize("case", ["out not empty", "no workdir",
                                  "no such step", "unknown format"])
def test_bad_input_is_one_line(case, trained_workdir, tmp_path):
  args, message = _bad_inputs(trained_workdir, tmp_path)[case]
  result = run_export(*args)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert errors == [message]
  assert result.stderr.strip().splitlines()[-1] == message
  # The user's file is untouched, and nothing else was written.
  assert (tmp_path / "taken" / "mine.txt").read_text() == "a user's file"
  assert sorted(os.listdir(tmp_path)) == ["taken"]
