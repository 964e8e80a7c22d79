"""Tests for mnist_resnet.data.mnist: finding, checking, loading the idx files.

Most tests run on real MNIST (skipped when it is absent); validation faults
use small crafted idx files. Downloads are tested in test_download.py.
"""

import hashlib
import pathlib

import numpy as np
import pytest

from mnist_resnet.core.errors import DataError
from mnist_resnet.data import idx
from mnist_resnet.data import mnist

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --- Real files --------------------------------------------------------------


def test_load_shapes_and_dtypes(mnist_dir):
  splits = mnist.load_mnist(mnist_dir)
  train, test = splits["train"], splits["test"]
  assert train.images.shape == (60000, 28, 28)
  assert test.images.shape == (10000, 28, 28)
  assert train.images.dtype == test.images.dtype == np.uint8
  assert train.labels.shape == (60000,) and test.labels.shape == (10000,)
  assert train.labels.dtype == test.labels.dtype == np.int32
  assert np.bincount(train.labels).tolist() == TRAIN_COUNTS
  assert np.bincount(test.labels).tolist() == TEST_COUNTS


def test_checksum_details_on_real_files(mnist_dir):
  paths = mnist.locate_files(mnist_dir, download=False)
  details = mnist.checksum_details(paths)
  assert list(details) == list(mnist.FILES)
  for name, (md5, _) in details.items():
    assert len(md5) == 32
    assert md5 in (mnist.GZ_MD5[name], mnist.RAW_MD5[name]) or \
        name == mnist.TRAIN_IMAGES
  # The training images here are a faithful rebuild, not the official bytes.
  assert {name: ok for name, (_, ok) in details.items()} == {
      mnist.TRAIN_IMAGES: False, mnist.TRAIN_LABELS: True,
      mnist.TEST_IMAGES: True, mnist.TEST_LABELS: True}


def test_recompressed_official_file_counts_as_official(mnist_dir, tmp_path):
  source = mnist.locate_files(mnist_dir, download=False)[mnist.TEST_LABELS]
  labels = idx.read_idx(source)
  target = tmp_path / (mnist.TEST_LABELS + ".gz")
  idx.write_idx(target, labels, compresslevel=1)
  raw = tmp_path / mnist.TEST_LABELS
  idx.write_idx(raw, labels)
  details = mnist.checksum_details({mnist.TEST_LABELS: target})
  assert details[mnist.TEST_LABELS][0] != mnist.GZ_MD5[mnist.TEST_LABELS]
  assert details[mnist.TEST_LABELS][1] is True
  assert mnist.checksum_details({mnist.TEST_LABELS: raw}) == {
      mnist.TEST_LABELS: (mnist.RAW_MD5[mnist.TEST_LABELS], True)}


def test_checksum_details_unknown_name_and_unreadable_file(tmp_path):
  path = tmp_path / "other"
  path.write_bytes(b"")
  assert mnist.checksum_details({"other": path}) == {
      "other": ("d41d8cd98f00b204e9800998ecf8427e", None)}
  with pytest.raises(DataError, match="absent: cannot read: "):
    mnist.checksum_details({mnist.TEST_LABELS: tmp_path / "absent"})


def test_local_md5_mismatch_warns_but_loads(mnist_dir, tmp_path, caplog):
  for name, path in mnist.locate_files(mnist_dir, download=False).items():
    (tmp_path / path.name).symlink_to(path)
  with caplog.at_level("WARNING"):
    splits = mnist.load_mnist(tmp_path)
  assert len(splits["train"].labels) == 60000
  warnings = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING"]
  assert len(warnings) == 1 and mnist.TRAIN_IMAGES in warnings[0]


def _md5(path: pathlib.Path) -> str:
  return hashlib.md5(path.read_bytes()).hexdigest()


def test_altered_official_file_warns_but_loads(mnist_dir, tmp_path, caplog):
  """One pixel changed in a valid copy of the official test images: not
  official any more (warned about, still loaded); untouched files still
  official. Independent of the shared training images being a rebuild."""
  paths = mnist.locate_files(mnist_dir, download=False)
  for name, path in paths.items():
    if name != mnist.TEST_IMAGES:
      (tmp_path / path.name).symlink_to(path)
  images = idx.read_idx(paths[mnist.TEST_IMAGES]).copy()
  images[123, 14, 14] ^= 1  # Still a valid idx file of valid digits.
  altered = tmp_path / (mnist.TEST_IMAGES + ".gz")
  idx.write_idx(altered, images)
  with caplog.at_level("WARNING"):
    splits = mnist.load_mnist(tmp_path)
  np.testing.assert_array_equal(splits["test"].images, images)
  assert len(splits["train"].labels) == 60000
  warnings = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING"]
  md5 = _md5(altered)
  assert sum(str(altered) in w and md5 in w for w in warnings) == 1
  for name in (mnist.TRAIN_LABELS, mnist.TEST_LABELS):
    assert not any(name in w for w in warnings)
  located = mnist.locate_files(tmp_path, download=False)
  details = mnist.checksum_details(located)
  assert details[mnist.TEST_IMAGES] == (md5, False)
  for name in (mnist.TRAIN_LABELS, mnist.TEST_LABELS):
    assert details[name] == (_md5(located[name]), True)
  source = paths[mnist.TEST_IMAGES]  # The untouched original.
  assert mnist.checksum_details({mnist.TEST_IMAGES: source}) == {
      mnist.TEST_IMAGES: (_md5(source), True)}
  # The same altered content uncompressed: not official either.
  raw = tmp_path / mnist.TEST_IMAGES
  idx.write_idx(raw, images)
  assert mnist.checksum_details({mnist.TEST_IMAGES: raw}) == {
      mnist.TEST_IMAGES: (_md5(raw), False)}


# --- Validation with crafted files ------------------------------------------


def _write_dir(directory: pathlib.Path, *, train_images=None,
               train_labels=None, test_images=None, test_labels=None):
  rng = np.random.default_rng(0)
  arrays = {
      mnist.TRAIN_IMAGES: train_images if train_images is not None else
      rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
      mnist.TRAIN_LABELS: train_labels if train_labels is not None else
      (np.arange(40) % 10).astype(np.uint8),
      mnist.TEST_IMAGES: test_images if test_images is not None else
      rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
      mnist.TEST_LABELS: test_labels if test_labels is not None else
      (np.arange(12) % 10).astype(np.uint8),
  }
  for name, array in arrays.items():
    idx.write_idx(directory / (name + ".gz"), array)
  return directory


def test_crafted_valid_dir_loads(tmp_path):
  splits = mnist.load_mnist(_write_dir(tmp_path), check_md5=False)
  assert splits["train"].images.shape == (40, 28, 28)
  assert splits["test"].labels.tolist() == [i % 10 for i in range(12)]


@pytest.mark.parametrize("kwargs,culprit,pattern", [
    ({"train_labels": np.zeros(39, np.uint8)}, mnist.TRAIN_LABELS,
     "39 labels but .* holds 40 images"),
    ({"test_labels": np.array([1] * 11 + [10], np.uint8)}, mnist.TEST_LABELS,
     "label 10 at index 11 is outside 0..9"),
    ({"test_images": np.zeros((12, 27, 28), np.uint8)}, mnist.TEST_IMAGES,
     r"shape \[N, 28, 28\], found uint8 \[12, 27, 28\]"),
    ({"train_images": np.zeros((40, 28, 28), np.int32)}, mnist.TRAIN_IMAGES,
     "found int32"),
    ({"train_labels": np.zeros((40, 1), np.uint8)}, mnist.TRAIN_LABELS,
     r"labels of shape \[N\]"),
])
def test_cross_file_checks(tmp_path, kwargs, culprit, pattern):
  _write_dir(tmp_path, **kwargs)
  with pytest.raises(DataError, match=pattern) as info:
    mnist.load_mnist(tmp_path, check_md5=False)
  message = str(info.value)
  assert message.startswith(str(tmp_path / culprit))
  assert "\n" not in message


def test_corrupt_file_raises_data_error(tmp_path):
  _write_dir(tmp_path)
  path = tmp_path / (mnist.TEST_IMAGES + ".gz")
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(DataError, match=str(path)):
    mnist.load_mnist(tmp_path, check_md5=False)


def test_missing_files_offline(tmp_path):
  _write_dir(tmp_path)
  (tmp_path / (mnist.TRAIN_IMAGES + ".gz")).unlink()
  (tmp_path / (mnist.TEST_LABELS + ".gz")).unlink()
  with pytest.raises(DataError) as info:
    mnist.load_mnist(tmp_path)
  assert str(info.value) == (
      f"missing {mnist.TRAIN_IMAGES}, {mnist.TEST_LABELS} in {tmp_path}: put "
      "the four MNIST idx files (.gz or uncompressed) there, or set "
      "--config.download=true")


def test_missing_dir_offline(tmp_path):
  with pytest.raises(DataError, match="missing .* in .*nowhere: put"):
    mnist.locate_files(tmp_path / "nowhere", download=False)
  assert not (tmp_path / "nowhere").exists()


def test_uncompressed_preferred(tmp_path):
  _write_dir(tmp_path)
  idx.write_idx(tmp_path / mnist.TEST_LABELS, np.zeros(12, np.uint8))
  paths = mnist.locate_files(tmp_path, download=False)
  assert paths[mnist.TEST_LABELS] == tmp_path / mnist.TEST_LABELS
  assert paths[mnist.TEST_IMAGES] == tmp_path / (mnist.TEST_IMAGES + ".gz")
