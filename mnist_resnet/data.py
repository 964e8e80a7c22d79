"""MNIST on disk -> validated arrays -> tf.data pipelines of uint8 batches.

Files: the four idx files, gzip-compressed or not, in one directory; missing
ones are downloaded only when asked, from a list of mirrors, and kept only if
their md5 is the official one. Local files are never rejected for their md5
(rebuilt or recompressed copies are legitimate); a mismatch is logged.

Training order is a pure function of (seed, step): epoch e = step //
steps_per_epoch is a permutation of all examples that depends only on
(seed, e), and global batch s is a fixed slice of it. Each process takes its
own rows of every global batch, so the global batch does not depend on how
many processes share it, and a run resumed at step s seeks straight to it.

The pipelines ship uint8 images: conversion, resizing and normalisation happen
on the accelerator. TensorFlow is imported only when a pipeline is built, and
is kept off the GPUs so that it does not take memory JAX needs.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
import zlib
from typing import TYPE_CHECKING, Mapping, NamedTuple, Optional, Sequence

from absl import logging
import numpy as np

from mnist_resnet import idx
from mnist_resnet.errors import DataError

if TYPE_CHECKING:
  import tensorflow as tf

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
SPLIT_FILES = {"train": (TRAIN_IMAGES, TRAIN_LABELS),
               "test": (TEST_IMAGES, TEST_LABELS)}

# md5 of the official gzip files, as served by the mirrors below.
GZ_MD5 = {
    TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
    TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
    TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
}
# md5 of the official uncompressed files. Recompressing changes a .gz file's
# md5 but not its content, so a .gz that does not match GZ_MD5 is also checked
# against these after decompression.
RAW_MD5 = {
    TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}
# Tried in order; yann.lecun.com last because it often refuses downloads.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DOWNLOAD_TIMEOUT_S = 60.0
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


class Split(NamedTuple):
  """One split in memory: uint8 images [N, 28, 28], int32 labels [N]."""
  images: np.ndarray
  labels: np.ndarray


# --- Files -----------------------------------------------------------------


def _one_line(text: object) -> str:
  return " ".join(str(text).split())


def _fetch(url: str, directory: pathlib.Path, filename: str,
           expected_md5: str, timeout: float) -> Optional[str]:
  """Downloads url to directory/filename; returns None or why it failed.

  The bytes go to a temporary file beside the target and are renamed into
  place only when their md5 is the official one, so an interrupted or bad
  download never leaves a file that a later run would trust.
  """
  try:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{filename}.",
                               suffix=".part")
  except OSError as e:
    raise DataError(f"{directory}: cannot write a download there: "
                    f"{_one_line(e.strerror or e)}") from e
  try:
    digest = hashlib.md5()
    with os.fdopen(fd, "wb") as out:
      with urllib.request.urlopen(url, timeout=timeout) as response:
        while chunk := response.read(1 << 20):
          digest.update(chunk)
          out.write(chunk)
    got = digest.hexdigest()
    if got != expected_md5:
      return f"{url}: md5 {got} is not the official {expected_md5}"
    os.replace(tmp, directory / filename)
    return None
  except urllib.error.HTTPError as e:
    return f"{url}: HTTP {e.code} {_one_line(e.reason)}"
  except urllib.error.URLError as e:
    return f"{url}: {_one_line(e.reason)}"
  except (OSError, http.client.HTTPException, ValueError) as e:
    return f"{url}: {_one_line(e) or type(e).__name__}"
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _download(name: str, directory: pathlib.Path, mirrors: Sequence[str],
              timeout: float) -> pathlib.Path:
  filename = name + ".gz"
  failures = []
  for base in mirrors:
    url = base.rstrip("/") + "/" + filename
    logging.info("Downloading %s", url)
    failure = _fetch(url, directory, filename, GZ_MD5[name], timeout)
    if failure is None:
      return directory / filename
    logging.warning("Download failed: %s", failure)
    failures.append(failure)
  tried = "; ".join(failures) or "no mirrors given"
  raise DataError(f"could not download {filename} into {directory}: {tried}")


def locate_files(data_dir: os.PathLike | str, *, download: bool,
                 mirrors: Optional[Sequence[str]] = None,
                 timeout: float = DOWNLOAD_TIMEOUT_S,
                 download_hint: str = "set --config.download=true"
                 ) -> dict[str, pathlib.Path]:
  """Finds the four idx files, downloading missing ones when allowed.

  An uncompressed file is preferred to its .gz (it loads several times
  faster). Missing files are fetched as .gz from `mirrors` (default:
  MIRRORS), tried in order. Returns file base name (e.g.
  "train-images-idx3-ubyte") -> path. `download_hint` ends the message for
  missing files: how the caller's user turns downloading on.

  Raises:
    DataError: a file is missing and download is False, or every mirror
      failed for it (the message says what each mirror did).
  """
  directory = pathlib.Path(data_dir)
  found: dict[str, pathlib.Path] = {}
  missing = []
  for name in FILES:
    for candidate in (directory / name, directory / (name + ".gz")):
      if candidate.is_file():
        found[name] = candidate
        break
    else:
      missing.append(name)
  if not missing:
    return found
  if not download:
    raise DataError(
        f"missing {', '.join(missing)} in {directory}: put the four MNIST idx "
        f"files (.gz or uncompressed) there, or {download_hint}")
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"{directory}: cannot create the data directory: "
                    f"{_one_line(e.strerror or e)}") from e
  for name in missing:
    found[name] = _download(name, directory,
                            MIRRORS if mirrors is None else mirrors, timeout)
  return {name: found[name] for name in FILES}


def _md5_of_file(path: pathlib.Path) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def _md5_of_gzip_content(path: pathlib.Path) -> Optional[str]:
  digest = hashlib.md5()
  try:
    with gzip.open(path, "rb") as f:
      while chunk := f.read(1 << 22):
        digest.update(chunk)
  except (OSError, EOFError, zlib.error):
    return None
  return digest.hexdigest()


def checksum_details(paths: Mapping[str, os.PathLike | str]
                     ) -> dict[str, tuple[str, Optional[bool]]]:
  """name -> (md5 of the file, whether its content is the official one).

  The flag is None for a name without a known official checksum. A file
  counts as official if it is the official .gz, the official uncompressed
  file, or a .gz whose decompressed content is the official file.
  """
  details = {}
  for name, path in paths.items():
    path = pathlib.Path(path)
    try:
      md5 = _md5_of_file(path)
    except OSError as e:
      raise DataError(f"{path}: cannot read: {_one_line(e.strerror or e)}"
                      ) from e
    official = {GZ_MD5.get(name), RAW_MD5.get(name)} - {None}
    if not official:
      details[name] = (md5, None)
      continue
    matches = md5 in official
    if not matches and RAW_MD5.get(name):
      with open(path, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
      if is_gzip:
        matches = _md5_of_gzip_content(path) == RAW_MD5[name]
    details[name] = (md5, matches)
  return details


def checksum_report(paths: Mapping[str, os.PathLike | str]
                    ) -> dict[str, Optional[bool]]:
  """name -> True (official content), False (differs) or None (unknown)."""
  return {name: ok for name, (_, ok) in checksum_details(paths).items()}


# --- Arrays ----------------------------------------------------------------


def _check_split(images: np.ndarray, labels: np.ndarray,
                 images_path: pathlib.Path, labels_path: pathlib.Path) -> None:
  if images.dtype != np.uint8 or images.ndim != 3 or \
      images.shape[1:] != IMAGE_SHAPE:
    raise DataError(
        f"{images_path}: expected uint8 images of shape [N, 28, 28], found "
        f"{images.dtype} {list(images.shape)}")
  if labels.dtype != np.uint8 or labels.ndim != 1:
    raise DataError(f"{labels_path}: expected uint8 labels of shape [N], "
                    f"found {labels.dtype} {list(labels.shape)}")
  if len(labels) != len(images):
    raise DataError(f"{labels_path}: {len(labels)} labels but {images_path} "
                    f"holds {len(images)} images")
  bad = np.flatnonzero(labels >= NUM_CLASSES)
  if bad.size:
    raise DataError(f"{labels_path}: label {labels[bad[0]]} at index "
                    f"{bad[0]} is outside 0..{NUM_CLASSES - 1} ({bad.size} "
                    "such labels)")


def load_mnist(data_dir: os.PathLike | str, *, download: bool = False,
               check_md5: bool = True) -> dict[str, Split]:
  """Reads and validates both splits: {"train": Split, "test": Split}.

  Args:
    data_dir: directory with the four idx files.
    download: fetch missing files from MIRRORS (verified against the
      official md5) instead of failing.
    check_md5: log a warning for each local file whose content is not the
      official one (never an error: rebuilt copies are legitimate).

  Raises:
    DataError: a file is missing, malformed, or inconsistent with its pair.
  """
  paths = locate_files(data_dir, download=download)
  splits = {}
  for split, (images_name, labels_name) in SPLIT_FILES.items():
    images = idx.read_idx(paths[images_name])
    labels = idx.read_idx(paths[labels_name])
    _check_split(images, labels, paths[images_name], paths[labels_name])
    splits[split] = Split(images, labels.astype(np.int32))
  if check_md5:
    for name, (md5, ok) in checksum_details(paths).items():
      if ok is False:
        logging.warning("%s: md5 %s is not that of the official MNIST file; "
                        "using it anyway", paths[name], md5)
  return splits


# --- Order -----------------------------------------------------------------


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped)."""
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be positive, got "
                     f"{global_batch_size}")
  steps = num_examples // global_batch_size
  if steps == 0:
    raise DataError(f"global batch size {global_batch_size} is larger than "
                    f"the {num_examples} training examples")
  return steps


# The order of an epoch is defined with 32-bit integer arithmetic so that it
# can be computed identically by numpy (the reference below) and inside the
# tf.data graph. Keeping Python out of the pipeline matters: a
# tf.numpy_function there holds the GIL against the training loop and can
# deadlock interpreter shutdown while a prefetching iterator is still alive.
_MIX_MUL1 = 0x7FEB352D
_MIX_MUL2 = 0x846CA68B
_SEED_SALT = 0x243F6A88
_KEY2_SALT = 0x85A308D3
_MASK32 = 0xFFFFFFFF


def _mix32(x: np.ndarray) -> np.ndarray:
  """A bijection of uint32 with full avalanche (Wellons' lowbias32)."""
  x = x ^ (x >> 16)
  x = x * np.uint32(_MIX_MUL1)
  x = x ^ (x >> 15)
  x = x * np.uint32(_MIX_MUL2)
  return x ^ (x >> 16)


def _epoch_keys(seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
  seed %= 2**64
  # Shape (1,), not 0-d: numpy warns on wrapping scalar arithmetic but not on
  # arrays, and wrapping is intended here.
  u32 = lambda v: np.array([v & _MASK32], dtype=np.uint32)
  a = _mix32(u32(seed) ^ np.uint32(_SEED_SALT))
  a = _mix32(a ^ u32(seed >> 32))
  a = _mix32(a ^ u32(epoch))
  a = _mix32(a ^ u32(epoch >> 32))
  return a, _mix32(a ^ np.uint32(_KEY2_SALT))


def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of epoch `epoch`: a pure function of (seed, epoch).

  Each example gets the key mix(mix(i ^ k1) + k2) with (k1, k2) derived from
  (seed, epoch); mix is a bijection, so keys are distinct and sorting them
  gives one well-defined pseudo-random permutation, the same on every machine
  and library version.
  """
  if num_examples >= 2**32:
    raise ValueError(f"at most 2^32 - 1 examples, got {num_examples}")
  k1, k2 = _epoch_keys(seed, epoch)
  keys = _mix32(_mix32(np.arange(num_examples, dtype=np.uint32) ^ k1) + k2)
  return np.argsort(keys)


def _epoch_permutation_tf(tf, num_examples: int, seed: int, epoch):
  """`_epoch_permutation` in TensorFlow ops, for a scalar int64 `epoch`."""

  def mix(x):
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, u32(16)))
    x = x * u32(_MIX_MUL1)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, u32(15)))
    x = x * u32(_MIX_MUL2)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, u32(16)))

  def u32(v):
    return tf.constant(v & _MASK32, tf.uint32)

  def low32(v):  # int64 tensor -> its low 32 bits as uint32.
    return tf.cast(tf.bitwise.bitwise_and(v, tf.constant(_MASK32, tf.int64)),
                   tf.uint32)

  seed %= 2**64
  epoch = tf.cast(epoch, tf.int64)
  a = mix(tf.bitwise.bitwise_xor(u32(seed), u32(_SEED_SALT)))
  a = mix(tf.bitwise.bitwise_xor(a, u32(seed >> 32)))
  a = mix(tf.bitwise.bitwise_xor(a, low32(epoch)))
  a = mix(tf.bitwise.bitwise_xor(a, low32(tf.bitwise.right_shift(
      epoch, tf.constant(32, tf.int64)))))
  k1, k2 = a, mix(tf.bitwise.bitwise_xor(a, u32(_KEY2_SALT)))
  index = tf.cast(tf.range(num_examples, dtype=tf.int64), tf.uint32)
  keys = mix(mix(tf.bitwise.bitwise_xor(index, k1)) + k2)
  # Keys are distinct, so any sort gives the same order as numpy's.
  return tf.argsort(tf.cast(keys, tf.int64), stable=True)


def global_batch_indices(num_examples: int, global_batch_size: int, seed: int,
                         step: int) -> np.ndarray:
  """Example indices of the global batch at `step` (reference definition)."""
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  spe = steps_per_epoch(num_examples, global_batch_size)
  epoch, index = divmod(step, spe)
  perm = _epoch_permutation(num_examples, seed, epoch)
  return perm[index * global_batch_size:(index + 1) * global_batch_size]


def _local_batch_size(global_batch_size: int, process_index: int,
                      process_count: int) -> int:
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, {process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataError(f"global batch size {global_batch_size} does not split "
                    f"evenly over {process_count} processes")
  return global_batch_size // process_count


# --- Pipelines -------------------------------------------------------------

_tf_ready = False


def _tensorflow():
  """Imports TensorFlow, hiding GPUs from it the first time."""
  global _tf_ready
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not _tf_ready:
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF's devices are already initialised.
      logging.warning("TensorFlow was initialised before the input pipeline "
                      "could hide the GPUs from it")
    _tf_ready = True
  return tf


# Images gathered per tf.data element before it is split into steps: enough
# to amortise per-element overhead at small batch sizes (16 steps of 128),
# small enough that the first batch comes quickly and buffers stay small.
_CHUNK_IMAGES = 2048


def train_dataset(split: Split, *, global_batch_size: int, seed: int,
                  start_step: int = 0, num_steps: Optional[int] = None,
                  process_index: int = 0, process_count: int = 1
                  ) -> "tf.data.Dataset":
  """Shuffled training batches of this process, from global step start_step.

  Yields {"image": uint8 [B, 28, 28], "label": int32 [B]} with
  B = global_batch_size // process_count: rows [p*B, (p+1)*B) of the global
  batch `global_batch_indices(N, global_batch_size, seed, step)` for
  step = start_step, start_step + 1, ... (num_steps of them; None: forever).
  """
  tf = _tensorflow()
  num_examples = len(split.labels)
  local = _local_batch_size(global_batch_size, process_index, process_count)
  spe = steps_per_epoch(num_examples, global_batch_size)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if num_steps is not None and num_steps < 0:
    raise ValueError(f"num_steps must be >= 0 or None, got {num_steps}")
  first_epoch, first_offset = divmod(start_step, spe)
  if num_steps is None:
    end_epoch = 2**62  # Effectively forever.
  else:
    end_epoch = -(-(start_step + num_steps) // spe)
  images = tf.constant(split.images)
  labels = tf.constant(split.labels.astype(np.int32, copy=False))

  def epoch_rows(epoch):
    """This process's example indices for each remaining step of `epoch`."""
    perm = _epoch_permutation_tf(tf, num_examples, seed, epoch)
    rows = tf.reshape(perm[:spe * global_batch_size], [spe, global_batch_size])
    rows = rows[:, process_index * local:(process_index + 1) * local]
    skip = tf.where(epoch == first_epoch, first_offset, 0)
    return tf.cast(rows[skip:], tf.int32)

  def gather(rows):
    return {"image": tf.gather(images, rows), "label": tf.gather(labels, rows)}

  ds = tf.data.Dataset.range(first_epoch, end_epoch)
  ds = ds.map(epoch_rows).unbatch()
  if num_steps is not None:
    ds = ds.take(num_steps)
  ds = ds.batch(max(1, _CHUNK_IMAGES // local))
  ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.unbatch()
  return ds.prefetch(tf.data.AUTOTUNE)


def test_dataset(split: Split, *, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> "tf.data.Dataset":
  """Every example once, in file order, padded to whole batches and masked.

  ceil(N / G) global batches; global batch b covers examples [b*G, (b+1)*G)
  and this process gets rows [p*B, (p+1)*B) of it. Rows past N are zeros
  with mask False, so every process yields the same number of batches (a
  collective step never waits on a process that ran out) and metrics that
  weight by the mask count each test example exactly once.
  """
  tf = _tensorflow()
  num_examples = len(split.labels)
  local = _local_batch_size(global_batch_size, process_index, process_count)
  num_batches = -(-num_examples // global_batch_size)
  images = tf.constant(split.images)
  labels = tf.constant(split.labels.astype(np.int32, copy=False))

  def batch(b):
    first = tf.cast(b, tf.int32) * global_batch_size + process_index * local
    index = first + tf.range(local, dtype=tf.int32)
    mask = index < num_examples
    safe = tf.minimum(index, num_examples - 1)
    image = tf.gather(images, safe)
    image = tf.where(mask[:, None, None], image, tf.zeros_like(image))
    label = tf.where(mask, tf.gather(labels, safe), 0)
    return {"image": image, "label": label, "mask": mask}

  ds = tf.data.Dataset.range(num_batches)
  ds = ds.map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)


# pytest would otherwise collect this public function as a test.
test_dataset.__test__ = False
