"""Files in a location that is a local directory or anything etils.epath
serves (`gs://bucket/run` on Cloud TPU): every file of a run goes through
`epath.Path`, never `open`/`os`. Object stores have no append and no
rename: files are written whole, in one upload (`write_atomic`), and trees
are moved by copying (`move_tree`). Which file lives where is `Workdir`'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any
from typing import Mapping

# etils.epath sends gs:// through tf.io.gfile when TensorFlow is importable;
# that ties the run directory to TensorFlow (absent on accelerator images) and
# to endpoints only TensorFlow knows. gcsfs serves gs:// for everything else
# (and STORAGE_EMULATOR_HOST for a local server). Read by epath at each use.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position

# pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_resnet.core import files
from mnist_resnet.core.errors import MnistResnetError
from mnist_resnet.core.files import is_remote  # noqa: F401  (until reporting.py moves)


class RunDirError(MnistResnetError):
  """The workdir cannot be used: unreachable, unwritable, in use, damaged."""


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as a path; local paths are made absolute (orbax needs it)."""
  text = os.fspath(workdir)
  if files.is_remote(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(text))


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return workdir_path(workdir) / "checkpoints"


def set_aside_dir(workdir: str | os.PathLike) -> epath.Path:
  return workdir_path(workdir) / "set_aside"


def profile_dir(workdir: str | os.PathLike) -> epath.Path:
  return workdir_path(workdir) / "profile"


def results_path(workdir: str | os.PathLike) -> epath.Path:
  return workdir_path(workdir) / "results.json"


def config_path(workdir: str | os.PathLike) -> epath.Path:
  return workdir_path(workdir) / "config.json"


def write_atomic(path: epath.Path, data: str | bytes) -> None:
  """Writes `path` whole: readers see the old content or the new, never part.

  Local: a temporary file renamed over the target. Object stores: one upload,
  which only becomes visible once complete.
  """
  payload = data.encode() if isinstance(data, str) else data
  if files.is_remote(path):
    path.write_bytes(payload)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = None
  try:
    fd, tmp = files.create_temp(path.parent, f".{path.name}.", ".tmp")
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    if tmp is not None:
      with contextlib.suppress(OSError):
        os.remove(tmp)
    # write() and fsync() errors (a full disk) carry no file name.
    raise OSError(e.errno, e.strerror, os.fspath(path)) from e


def to_json(record: Mapping[str, Any]) -> str:
  """Strict JSON: NaN and infinity become null (json.dumps would write NaN,
  which JSON readers reject)."""
  def clean(value):
    if isinstance(value, float) and not math.isfinite(value):
      return None
    if isinstance(value, dict):
      return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [clean(v) for v in value]
    return value
  return json.dumps(clean(dict(record)), indent=2, default=str,
                    allow_nan=False) + "\n"


def write_results(workdir: str | os.PathLike,
                  results: Mapping[str, Any]) -> epath.Path:
  path = results_path(workdir)
  write_atomic(path, to_json(results))
  return path


def read_json(path: epath.Path) -> dict[str, Any] | None:
  """The JSON object in `path`, None if there is no such file."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise RunDirError(f"{path} is not valid JSON ({e}); move it away or use "
                      "a new workdir") from None
  if not isinstance(value, dict):
    raise RunDirError(f"{path} does not hold a JSON object")
  return value


def check_is_directory(path: epath.Path) -> None:
  """A workdir entry the run will write under must not be a file: found now,
  not at the first save after hours of training."""
  if path.exists() and not path.is_dir():
    raise RunDirError(f"{path} is a file, not a directory; move it away")


def free_name(directory: epath.Path, name: str) -> epath.Path:
  """directory/name, or name.2, name.3, ... if taken: a step set aside
  again (the same divergence on a retry) never collides with the first."""
  candidate, n = directory / name, 1
  while candidate.exists():
    n += 1
    candidate = directory / f"{name}.{n}"
  return candidate


def move_tree(source: epath.Path, destination: epath.Path) -> None:
  """Moves a directory. Object stores have no rename: copy every object,
  then delete the source (a crash in between leaves both, never neither)."""
  destination.parent.mkdir(parents=True, exist_ok=True)
  if not files.is_remote(source):
    os.replace(source, destination)
    return
  for item in _files_under(source):
    target = destination / item.relative_to(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    item.copy(target, overwrite=True)
  source.rmtree()


def _files_under(directory: epath.Path):
  for item in directory.iterdir():
    if item.is_dir():
      yield from _files_under(item)
    else:
      yield item


# Config keys that change where or how a run runs, not what it computes: a
# resume may change them. Every other key changes the trajectory (seed,
# model, optimizer, data, ...), and a resume that changes one is refused.
# num_train_steps/num_epochs may grow: the run goes on from its checkpoint
# (the learning-rate schedule is stretched to the new length).
RESUMABLE_KEYS = frozenset({
    "data_dir", "download", "pretrained_weights",
    "log_every_steps", "eval_every_steps", "eval_batch_size",
    "checkpoint_every_steps", "max_checkpoints_to_keep", "profile_steps",
    "distributed", "coordinator_address", "num_processes", "process_id",
    "num_train_steps", "num_epochs",
    "input_pipeline", "compilation_cache_dir", "deterministic", "conv_as_dot",
})


# Every config key added after a workdir could first be written, with the
# value that reproduces how runs behaved before it existed: an older
# config.json is read through it, so a new key never makes an older run
# refuse to resume or to load. A key added to configs/default.py is added
# here too (tests/test_rundir.py fails until it is).
ADDED_KEYS = {
    "distributed": False, "coordinator_address": "", "num_processes": -1,
    "process_id": -1,
    "validation_examples": 0,
    "compilation_cache_dir": "",
    "deterministic": False, "input_pipeline": "tfdata",
    "conv_as_dot": "auto",
}


def read_saved_config(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """config.json of the run in `workdir`, with the keys added since it was
  written at their ADDED_KEYS values; None if there is none."""
  saved = read_json(config_path(workdir))
  if saved is None:
    return None
  if not isinstance(saved, dict) or "model" not in saved:
    raise RunDirError(f"{config_path(workdir)} is not a training config")
  return {**ADDED_KEYS, **saved}


def as_json(config: Mapping[str, Any]) -> dict[str, Any]:
  """`config` as strict JSON reads it back (tuples as lists, NaN as None)."""
  return json.loads(to_json(config))


def save_config(workdir: str | os.PathLike, config: Mapping[str, Any]) -> None:
  write_atomic(config_path(workdir), to_json(config))


def check_resume_config(workdir: str | os.PathLike,
                        config: Mapping[str, Any]) -> None:
  """Refuses a config that would change the trajectory of the saved run."""
  saved = read_saved_config(workdir)
  if saved is None:
    return
  current = as_json(config)
  missing = object()
  changed = [
      f"{k} {saved.get(k, missing)!r} -> {current.get(k, missing)!r}"
      .replace(repr(missing), "(unset)")
      for k in sorted(set(saved) | set(current))
      if k not in RESUMABLE_KEYS and saved.get(k, missing) != current.get(
          k, missing)]
  if changed:
    raise RunDirError(
        f"{config_path(workdir)} holds another run: {'; '.join(changed)}; "
        "rerun with the saved values or use a new workdir")
