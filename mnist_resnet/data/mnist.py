"""The MNIST files on disk -> validated arrays.

Files: the four idx files, gzip-compressed or not, in one directory; missing
ones are downloaded only when asked, from a list of mirrors, and kept only if
their md5 is the official one. Local files are never rejected for their md5
(rebuilt or recompressed copies are legitimate); a mismatch is logged.

This is also the one home of the dataset's constants: the digit size and the
number of classes.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import pathlib
from typing import Mapping
from typing import NamedTuple
from typing import Optional
from typing import Sequence
import urllib.error
import urllib.request
import zlib

from absl import logging
import numpy as np

from mnist_resnet.core import files
from mnist_resnet.core.errors import DataError
from mnist_resnet.core.errors import one_line
from mnist_resnet.data import idx

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
IMAGE_SIZE = 28  # The digits are IMAGE_SIZE x IMAGE_SIZE pixels.
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE)
NUM_CLASSES = 10
# The official training split's size: what a run without the files (the
# benchmark's step mode) sizes its schedule for.
TRAIN_EXAMPLES = 60_000


class Split(NamedTuple):
  """One split in memory: uint8 images [N, 28, 28], int32 labels [N]."""
  images: np.ndarray
  labels: np.ndarray


# --- Files -----------------------------------------------------------------


def _fetch(url: str, directory: pathlib.Path, filename: str,
           expected_md5: str, timeout: float) -> Optional[str]:
  """Downloads url to directory/filename; returns None or why it failed.

  The bytes go to a temporary file beside the target and are renamed into
  place only when their md5 is the official one, so an interrupted or bad
  download never leaves a file that a later run would trust.
  """
  try:
    # Not mkstemp: its 0600 would stay on the renamed file.
    fd, tmp = files.create_temp(directory, f".{filename}.", ".part")
  except OSError as e:
    raise DataError(f"{directory}: cannot write a download there: "
                    f"{one_line(e.strerror or e)}") from e
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
    return f"{url}: HTTP {e.code} {one_line(e.reason)}"
  except urllib.error.URLError as e:
    return f"{url}: {one_line(e.reason)}"
  except (OSError, http.client.HTTPException, ValueError) as e:
    return f"{url}: {one_line(e) or type(e).__name__}"
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
                    f"{one_line(e.strerror or e)}") from e
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
      raise DataError(f"{path}: cannot read: {one_line(e.strerror or e)}"
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


# --- Arrays ----------------------------------------------------------------


def _check_split(images: np.ndarray, labels: np.ndarray,
                 images_path: pathlib.Path, labels_path: pathlib.Path) -> None:
  if images.dtype != np.uint8 or images.ndim != 3 or \
      images.shape[1:] != IMAGE_SHAPE:
    raise DataError(
        f"{images_path}: expected uint8 images of shape "
        f"[N, {IMAGE_SIZE}, {IMAGE_SIZE}], found "
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


def check_not_empty(splits: Mapping[str, Split],
                    data_dir: os.PathLike | str) -> None:
  """Raises DataError naming the images file of the first split that holds
  no images: valid idx files, but nothing to train or evaluate on."""
  for split, (images_name, _) in SPLIT_FILES.items():
    if split in splits and not len(splits[split].labels):
      path = locate_files(data_dir, download=False)[images_name]
      raise DataError(f"{path}: the {split} split holds 0 images")


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
