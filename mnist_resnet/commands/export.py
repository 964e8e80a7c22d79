"""Exports a trained model for serving outside this project.

    python -m mnist_resnet.export --workdir=DIR [--step=latest|best|N] \\
        --out=DIR [--formats=jax_export,saved_model] \\
        [--platforms=cpu,cuda,tpu]

The model with its preprocessing and weights, uint8 digits [batch, 28, 28]
-> float32 probabilities [batch, 10], as a `jax.export` artifact and a
TensorFlow SavedModel: docs/trained_model.md#export-for-serving.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
from typing import Any
from typing import Callable
from typing import Iterator
from typing import NoReturn

from absl import flags
import jax
import jax.numpy as jnp

from mnist_resnet.core import cli
from mnist_resnet.core import tf_host
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.data import mnist
from mnist_resnet.model import pretrained
from mnist_resnet.training import trained

JAX_EXPORT = "jax_export"
SAVED_MODEL = "saved_model"
FORMATS = (JAX_EXPORT, SAVED_MODEL)
# Where each format is written under --out.
FORMAT_PATHS = {JAX_EXPORT: "model.jax_export", SAVED_MODEL: "saved_model"}
MANIFEST = "export.json"
# Platforms jax.export can lower for; any of them, from any machine.
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
# The exported function's one input and one output (the SavedModel's
# signature names them so).
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


def _choices(values: list[str], known: tuple[str, ...], flag: str
             ) -> tuple[str, ...]:
  """`values` without repeats, each one of `known` (ConfigError if not)."""
  chosen = tuple(dict.fromkeys(v.strip() for v in values if v.strip()))
  unknown = [v for v in chosen if v not in known]
  if unknown or not chosen:
    raise ConfigError(f"--{flag}={','.join(values)}: must be one or more of "
                      f"{', '.join(known)}")
  return chosen


def check_tensorflow(formats: tuple[str, ...]) -> None:
  """A SavedModel needs TensorFlow and jax2tf: said before any work."""
  if SAVED_MODEL not in formats:
    return
  for module, what in (("tensorflow", "TensorFlow"),
                       ("jax.experimental.jax2tf", "jax.experimental.jax2tf")):
    if importlib.util.find_spec(module) is None:
      raise ConfigError(f"--formats={SAVED_MODEL} needs {what}, which is not "
                        f"installed; pass --formats={JAX_EXPORT} for the jax "
                        "artifact alone")


def probabilities_fn(model) -> Callable:
  """The function exported: uint8 [B, 28, 28] -> float32 [B, 10]
  probabilities, the weights of `model` (a TrainedModel) inside it."""

  def probabilities(images):
    return jax.nn.softmax(model.logits(images), axis=-1)
  return probabilities


def export_jax(fn: Callable, platforms: tuple[str, ...]):
  """`fn` as a jax.export.Exported with a symbolic batch dimension."""
  shape = jax.export.symbolic_shape(
      f"batch, {mnist.IMAGE_SIZE}, {mnist.IMAGE_SIZE}")
  images = jax.ShapeDtypeStruct(shape, jnp.uint8)
  return jax.export.export(jax.jit(fn), platforms=platforms)(images)


def write_bytes(path: str, data: bytes) -> None:
  """A new file at `path`; a failed write names it (f.write's OSError names
  no file)."""
  try:
    with open(path, "xb") as f:
      f.write(data)
  except OSError as e:
    if e.filename is None:
      raise OSError(e.errno, e.strerror, path) from e
    raise


def save_saved_model(exported, path: str) -> str:
  """Writes `exported` (its platforms, its symbolic batch) as a SavedModel
  at `path`; returns TensorFlow's version."""
  tf = tf_host.import_tensorflow()
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  # jax2tf lowers `exported.call`, which inlines the module exported above:
  # both formats hold one and the same computation. Native serialization
  # is jax2tf's only mode now (its flag is deprecated).
  converted = jax2tf.convert(
      exported.call,
      polymorphic_shapes=[f"(batch, {mnist.IMAGE_SIZE}, {mnist.IMAGE_SIZE})"],
      with_gradient=False,
      native_serialization_platforms=exported.platforms)
  module = tf.Module()

  @tf.function(autograph=False, input_signature=[tf.TensorSpec(
      [None, *mnist.IMAGE_SHAPE], tf.uint8, name=INPUT_NAME)])
  def serve(images):
    return {OUTPUT_NAME: converted(images)}

  module.serve = serve  # Also callable as `loaded.serve(images)`.
  try:
    tf.saved_model.save(module, path, signatures={"serving_default": serve})
  except tf.errors.OpError as e:
    raise _tf_write_error(e, path) from e
  return tf.__version__


def _tf_write_error(e, path: str) -> Exception:
  """TensorFlow's error for a failed write as the OSError it stands for (so
  that `files.write_failure` makes it one line); others unchanged."""
  # TensorFlow says "FILE; No space left on device".
  text = " ".join(str(e.message).split())
  where, _, reason = text.rpartition("; ")
  for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
    if os.strerror(code).lower() in reason.lower():
      return OSError(code, os.strerror(code),
                     where if where.startswith(path) else path)
  return e


def sha256_of_files(directory: str) -> dict[str, str]:
  """{path relative to `directory`: sha256} of every file under it."""
  digests = {}
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    for name in sorted(names):
      path = os.path.join(root, name)
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
      digests[os.path.relpath(path, directory)] = digest.hexdigest()
  return digests


def manifest(model, exported, formats: tuple[str, ...],
             versions: dict[str, str], digests: dict[str, str]
             ) -> dict[str, Any]:
  """export.json's content."""
  workdir = model.workdir
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  return {
      "workdir": workdir,
      "step": model.step,
      "model": model.config.get("model"),
      "formats": {f: FORMAT_PATHS[f] for f in formats},
      "input": {"name": INPUT_NAME, "dtype": "uint8",
                "shape": ["batch", *mnist.IMAGE_SHAPE],
                "meaning": "MNIST digits, 0-255, white on black"},
      "output": {"name": OUTPUT_NAME, "dtype": "float32",
                 "shape": ["batch", mnist.NUM_CLASSES],
                 "meaning": "softmax probability of each digit 0-9"},
      "platforms": list(exported.platforms),
      "jax_export_calling_convention_version":
          exported.calling_convention_version,
      "versions": versions,
      "sha256": digests,
  }


def _new_directory(parent: str, prefix: str) -> str:
  """A new directory in `parent`, of a name not taken, with the usual mode
  (the umask's; tempfile.mkdtemp's is 0700)."""
  while True:
    path = os.path.join(parent, prefix + secrets.token_hex(4))
    try:
      os.mkdir(path)
      return path
    except FileExistsError:
      continue


@contextlib.contextmanager
def staging_directory(out: str) -> Iterator[str]:
  """A directory to write the export in, moved to `out` when the block ends
  without error, removed otherwise.

  A new `out` appears whole, by one rename of a directory beside it. An
  existing (empty) one keeps its inode, which may be a mount point or a
  shell's working directory: the export is written inside it, and the
  finished files are moved up.
  """
  existed = os.path.isdir(out)
  parent = out if existed else os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = _new_directory(parent, f".{os.path.basename(out)}.export-tmp-")
  try:
    yield staging
    if existed:
      for name in sorted(os.listdir(staging)):
        target = os.path.join(out, name)
        if os.path.lexists(target):
          _filled_meanwhile(out)
        os.rename(os.path.join(staging, name), target)
      os.rmdir(staging)
    else:
      try:
        os.rename(staging, out)  # Replaces an empty directory made meanwhile.
      except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
          _filled_meanwhile(out)
        raise
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _filled_meanwhile(out: str) -> NoReturn:
  raise ConfigError(f"--out {out} was filled while exporting; refusing to "
                    "overwrite it")


def export(workdir: str, step: str, out: str, formats: tuple[str, ...],
           platforms: tuple[str, ...]) -> dict[str, Any]:
  """Writes the export of checkpoint `step` of `workdir` to `out` (checked
  by the caller); returns its manifest."""

  model = trained.load(workdir, step)
  exported = export_jax(probabilities_fn(model), platforms)
  versions = {"jax": jax.__version__}
  with staging_directory(out) as staging:
    if JAX_EXPORT in formats:
      write_bytes(os.path.join(staging, FORMAT_PATHS[JAX_EXPORT]),
                  bytes(exported.serialize()))
    if SAVED_MODEL in formats:
      versions["tensorflow"] = save_saved_model(
          exported, os.path.join(staging, FORMAT_PATHS[SAVED_MODEL]))
    report = manifest(model, exported, formats, versions,
                      sha256_of_files(staging))
    write_bytes(os.path.join(staging, MANIFEST),
                (json.dumps(report, indent=2) + "\n").encode())
  return report


def _define_flags() -> None:
  # Only when run as a program: the other tools of a run define --workdir
  # and --step too, and a process may import several of them.
  flags.DEFINE_string("workdir", None,
                      "The training run's workdir (or gs://BUCKET/PATH).")
  flags.DEFINE_string("step", "latest", "Checkpoint to export: latest, best "
                      "(by validation accuracy) or a step number.")
  flags.DEFINE_string("out", None,
                      "New (or empty) directory the export is written to.")
  flags.DEFINE_list("formats", list(FORMATS),
                    f"What to write, any of {', '.join(FORMATS)}.")
  flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS),
                    "Platforms the model is lowered for, any of "
                    f"{', '.join(KNOWN_PLATFORMS)}.")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  with cli.user_errors():
    trained.parse_step(f.step)
    formats = _choices(f.formats, FORMATS, "formats")
    platforms = _choices(f.platforms, KNOWN_PLATFORMS, "platforms")
    check_tensorflow(formats)
    out = pretrained.require_new_directory(f.out)
    report = export(f.workdir, f.step, out, formats, platforms)
  print(f"wrote {out}: step {report['step']} of {report['workdir']} as "
        f"{', '.join(report['formats'])} for "
        f"{', '.join(report['platforms'])}", flush=True)


def run() -> None:
  """The command, as `python -m` runs it."""
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
