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

# gs:// goes through gcsfs, not tf.io.gfile: mnist_resnet/__init__.py.
from etils import epath
import fsspec.config

# gcsfs waits for an answer without end by default: a bucket that stops
# answering (rather than refusing connections) would hang the run. A limit
# per request (one small file, or one chunk of a profile's upload), with
# gcsfs's 6 tries and their back-off, ends such a write in about 2.5 min.
STORAGE_REQUEST_TIMEOUT_S = 20
fsspec.config.conf.setdefault("gs", {}).setdefault(
    "requests_timeout", STORAGE_REQUEST_TIMEOUT_S)

# pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_resnet.core import files
from mnist_resnet.core.errors import MnistResnetError


class RunDirError(MnistResnetError):
  """The workdir cannot be used: unreachable, unwritable, in use, damaged."""


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as a path; local paths are made absolute (orbax needs it)."""
  text = os.fspath(workdir)
  if files.is_remote(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(text))


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


def read_json(path: epath.Path) -> dict[str, Any] | None:
  """The JSON object in `path`, None if there is no such file.

  RunDirError when `path` is a directory, or holds anything but a JSON
  object in UTF-8 (binary bytes included): one line, never a traceback.
  """
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return None
  except IsADirectoryError:
    raise RunDirError(f"{path} is a directory, not a file; move it "
                      "away") from None
  try:
    value = json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise RunDirError(f"{path} is not UTF-8 text (byte {e.start}); move it "
                      "away or use a new workdir") from None
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


def as_json(config: Mapping[str, Any]) -> dict[str, Any]:
  """`config` as strict JSON reads it back (tuples as lists, NaN as None)."""
  return json.loads(to_json(config))
