"""Tests for mnist_resnet.data: loading, validation, and the pipelines' order.

Most tests run on real MNIST (skipped when it is absent); validation faults
use small crafted idx files.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mnist_resnet import data
from mnist_resnet import idx
from mnist_resnet.errors import DataError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist(mnist_dir):
  return data.load_mnist(mnist_dir)


def _batches(ds, n=None):
  it = ds.as_numpy_iterator()
  return [b for _, b in zip(range(n), it)] if n is not None else list(it)


# --- Loading -----------------------------------------------------------------


def test_load_shapes_and_dtypes(mnist):
  train, test = mnist["train"], mnist["test"]
  assert train.images.shape == (60000, 28, 28)
  assert test.images.shape == (10000, 28, 28)
  assert train.images.dtype == test.images.dtype == np.uint8
  assert train.labels.shape == (60000,) and test.labels.shape == (10000,)
  assert train.labels.dtype == test.labels.dtype == np.int32
  assert np.bincount(train.labels).tolist() == TRAIN_COUNTS
  assert np.bincount(test.labels).tolist() == TEST_COUNTS


def test_checksum_report_on_real_files(mnist_dir):
  paths = data.locate_files(mnist_dir, download=False)
  report = data.checksum_report(paths)
  # The training images here are a faithful rebuild, not the official bytes.
  assert report == {data.TRAIN_IMAGES: False, data.TRAIN_LABELS: True,
                    data.TEST_IMAGES: True, data.TEST_LABELS: True}


def test_recompressed_official_file_counts_as_official(mnist_dir, tmp_path):
  source = data.locate_files(mnist_dir, download=False)[data.TEST_LABELS]
  labels = idx.read_idx(source)
  target = tmp_path / (data.TEST_LABELS + ".gz")
  idx.write_idx(target, labels, compresslevel=1)
  raw = tmp_path / data.TEST_LABELS
  idx.write_idx(raw, labels)
  details = data.checksum_details({data.TEST_LABELS: target})
  assert details[data.TEST_LABELS][0] != data.GZ_MD5[data.TEST_LABELS]
  assert details[data.TEST_LABELS][1] is True
  assert data.checksum_report({data.TEST_LABELS: raw}) == {
      data.TEST_LABELS: True}


def test_local_md5_mismatch_warns_but_loads(mnist_dir, tmp_path, caplog):
  for name, path in data.locate_files(mnist_dir, download=False).items():
    (tmp_path / path.name).symlink_to(path)
  with caplog.at_level("WARNING"):
    splits = data.load_mnist(tmp_path)
  assert len(splits["train"].labels) == 60000
  warnings = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING"]
  assert len(warnings) == 1 and data.TRAIN_IMAGES in warnings[0]


# --- Validation with crafted files ------------------------------------------


def _write_dir(directory: pathlib.Path, *, train_images=None,
               train_labels=None, test_images=None, test_labels=None):
  rng = np.random.default_rng(0)
  arrays = {
      data.TRAIN_IMAGES: train_images if train_images is not None else
      rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
      data.TRAIN_LABELS: train_labels if train_labels is not None else
      (np.arange(40) % 10).astype(np.uint8),
      data.TEST_IMAGES: test_images if test_images is not None else
      rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
      data.TEST_LABELS: test_labels if test_labels is not None else
      (np.arange(12) % 10).astype(np.uint8),
  }
  for name, array in arrays.items():
    idx.write_idx(directory / (name + ".gz"), array)
  return directory


def test_crafted_valid_dir_loads(tmp_path):
  splits = data.load_mnist(_write_dir(tmp_path), check_md5=False)
  assert splits["train"].images.shape == (40, 28, 28)
  assert splits["test"].labels.tolist() == [i % 10 for i in range(12)]


@pytest.mark.parametrize("kwargs,culprit,pattern", [
    ({"train_labels": np.zeros(39, np.uint8)}, data.TRAIN_LABELS,
     "39 labels but .* holds 40 images"),
    ({"test_labels": np.array([1] * 11 + [10], np.uint8)}, data.TEST_LABELS,
     "label 10 at index 11 is outside 0..9"),
    ({"test_images": np.zeros((12, 27, 28), np.uint8)}, data.TEST_IMAGES,
     r"shape \[N, 28, 28\], found uint8 \[12, 27, 28\]"),
    ({"train_images": np.zeros((40, 28, 28), np.int32)}, data.TRAIN_IMAGES,
     "found int32"),
    ({"train_labels": np.zeros((40, 1), np.uint8)}, data.TRAIN_LABELS,
     r"labels of shape \[N\]"),
])
def test_cross_file_checks(tmp_path, kwargs, culprit, pattern):
  _write_dir(tmp_path, **kwargs)
  with pytest.raises(DataError, match=pattern) as info:
    data.load_mnist(tmp_path, check_md5=False)
  message = str(info.value)
  assert message.startswith(str(tmp_path / culprit))
  assert "\n" not in message


def test_corrupt_file_raises_data_error(tmp_path):
  _write_dir(tmp_path)
  path = tmp_path / (data.TEST_IMAGES + ".gz")
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(DataError, match=str(path)):
    data.load_mnist(tmp_path, check_md5=False)


def test_missing_files_offline(tmp_path):
  _write_dir(tmp_path)
  (tmp_path / (data.TRAIN_IMAGES + ".gz")).unlink()
  (tmp_path / (data.TEST_LABELS + ".gz")).unlink()
  with pytest.raises(DataError) as info:
    data.load_mnist(tmp_path)
  assert str(info.value) == (
      f"missing {data.TRAIN_IMAGES}, {data.TEST_LABELS} in {tmp_path}: put "
      "the four MNIST idx files (.gz or uncompressed) there, or set "
      "--config.download=true")


def test_missing_dir_offline(tmp_path):
  with pytest.raises(DataError, match="missing .* in .*nowhere: put"):
    data.locate_files(tmp_path / "nowhere", download=False)
  assert not (tmp_path / "nowhere").exists()


def test_uncompressed_preferred(tmp_path):
  _write_dir(tmp_path)
  idx.write_idx(tmp_path / data.TEST_LABELS, np.zeros(12, np.uint8))
  paths = data.locate_files(tmp_path, download=False)
  assert paths[data.TEST_LABELS] == tmp_path / data.TEST_LABELS
  assert paths[data.TEST_IMAGES] == tmp_path / (data.TEST_IMAGES + ".gz")


def test_import_does_not_load_tensorflow():
  code = ("import sys, mnist_resnet.data; "
          "sys.exit('tensorflow' in sys.modules)")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT,
                 env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


# --- Training pipeline -------------------------------------------------------


def test_train_batches_shapes_and_reference_order(mnist):
  train = mnist["train"]
  ds = data.train_dataset(train, global_batch_size=128, seed=3, num_steps=5)
  spec = ds.element_spec
  assert spec["image"].shape.as_list() == [None, 28, 28] or \
      spec["image"].shape.as_list() == [128, 28, 28]
  batches = _batches(ds)
  assert len(batches) == 5
  for step, batch in enumerate(batches):
    assert batch["image"].dtype == np.uint8
    assert batch["image"].shape == (128, 28, 28)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (128,)
    ref = data.global_batch_indices(60000, 128, 3, step)
    np.testing.assert_array_equal(batch["image"], train.images[ref])
    np.testing.assert_array_equal(batch["label"], train.labels[ref])


def test_epoch_covers_file_histogram(mnist):
  train = mnist["train"]
  batches = _batches(data.train_dataset(train, global_batch_size=1000,
                                        seed=0, num_steps=60))
  labels = np.concatenate([b["label"] for b in batches])
  assert np.bincount(labels, minlength=10).tolist() == TRAIN_COUNTS
  # Every example exactly once: compare images too, via their sum per class.
  images = np.concatenate([b["image"] for b in batches])
  assert images.astype(np.int64).sum() == train.images.astype(np.int64).sum()


def test_epochs_differ_and_reference_is_a_permutation():
  a = np.concatenate([data.global_batch_indices(1000, 100, 0, s)
                      for s in range(10)])
  b = np.concatenate([data.global_batch_indices(1000, 100, 0, s)
                      for s in range(10, 20)])
  assert sorted(a.tolist()) == sorted(b.tolist()) == list(range(1000))
  assert not np.array_equal(a, b)
  # Drop remainder: 1050 examples at batch 100 -> 10 steps per epoch, each
  # epoch 1000 distinct examples, and step 10 starts a new permutation.
  assert data.steps_per_epoch(1050, 100) == 10
  epoch0 = np.concatenate([data.global_batch_indices(1050, 100, 0, s)
                           for s in range(10)])
  assert len(np.unique(epoch0)) == 1000 and epoch0.max() < 1050
  assert not np.array_equal(data.global_batch_indices(1050, 100, 0, 10),
                            data.global_batch_indices(1050, 100, 0, 0))


def test_orders_look_independent():
  n = 60000
  ranks = lambda perm: np.argsort(perm).astype(np.float64)
  base = ranks(np.concatenate([data.global_batch_indices(n, 1000, 0, s)
                               for s in range(60)]))
  for seed, step in ((0, 60), (1, 0), (2**40, 0)):
    other = ranks(np.concatenate([data.global_batch_indices(n, 1000, seed, s)
                                  for s in range(step, step + 60)]))
    assert abs(np.corrcoef(base, other)[0, 1]) < 0.02
  # Not close to file order either.
  assert abs(np.corrcoef(base, np.arange(n))[0, 1]) < 0.02


@pytest.mark.parametrize("seed", [0, -1, 2**33 + 5])
def test_pipeline_matches_reference_for_extreme_seeds_and_epochs(seed):
  """The in-graph order equals the numpy reference, high bits included."""
  rng = np.random.default_rng(0)
  split = data.Split(rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
                     np.arange(100, dtype=np.int32))
  start = 10 * (2**32 + 3) + 7  # Epoch beyond 2^32, 10 steps per epoch.
  batches = _batches(data.train_dataset(split, global_batch_size=10, seed=seed,
                                        start_step=start, num_steps=5))
  for step, batch in enumerate(batches, start=start):
    np.testing.assert_array_equal(
        batch["label"], data.global_batch_indices(100, 10, seed, step))


def test_same_seed_same_batches_other_seed_different(mnist):
  train = mnist["train"]
  make = lambda seed: _batches(data.train_dataset(
      train, global_batch_size=256, seed=seed, num_steps=3))
  a, b, c = make(7), make(7), make(8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["label"], c[0]["label"])


@pytest.mark.parametrize("start_step", [0, 3, 58, 60, 119])
def test_start_step_seeks(mnist, start_step):
  train = mnist["train"]
  # 60 steps per epoch: 58..61 and 119..122 cross an epoch boundary.
  full = _batches(data.train_dataset(train, global_batch_size=1000, seed=5,
                                     num_steps=start_step + 4))
  resumed = _batches(data.train_dataset(train, global_batch_size=1000, seed=5,
                                        start_step=start_step, num_steps=4))
  assert len(resumed) == 4
  for x, y in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_infinite_by_default(mnist):
  ds = data.train_dataset(mnist["train"], global_batch_size=20000, seed=0,
                          start_step=1)
  batches = _batches(ds, 7)  # 3 steps per epoch: crosses two boundaries.
  assert len(batches) == 7
  for step, batch in enumerate(batches, start=1):
    ref = data.global_batch_indices(60000, 20000, 0, step)
    np.testing.assert_array_equal(batch["label"], mnist["train"].labels[ref])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_partition_the_global_batch(mnist, process_count):
  train = mnist["train"]
  g = 1000
  start = 59  # Crosses into epoch 1 after one step.
  whole = _batches(data.train_dataset(train, global_batch_size=g, seed=1,
                                      start_step=start, num_steps=3))
  shards = [_batches(data.train_dataset(
      train, global_batch_size=g, seed=1, start_step=start, num_steps=3,
      process_index=p, process_count=process_count))
            for p in range(process_count)]
  for step in range(3):
    parts = [shards[p][step] for p in range(process_count)]
    for part in parts:
      assert part["image"].shape == (g // process_count, 28, 28)
    np.testing.assert_array_equal(
        np.concatenate([p["label"] for p in parts]), whole[step]["label"])
    np.testing.assert_array_equal(
        np.concatenate([p["image"] for p in parts]), whole[step]["image"])
  # Disjoint within an epoch: the processes' examples of epoch 1 steps.
  ref = [data.global_batch_indices(60000, g, 1, s) for s in (60, 61)]
  per_process = [np.concatenate([r[p * (g // process_count):
                                   (p + 1) * (g // process_count)]
                                 for r in ref])
                 for p in range(process_count)]
  union = np.concatenate(per_process)
  assert len(np.unique(union)) == len(union) == 2 * g


def test_train_rejects_bad_sizes(mnist):
  train = mnist["train"]
  with pytest.raises(DataError, match="does not split evenly"):
    data.train_dataset(train, global_batch_size=100, seed=0, process_count=3)
  with pytest.raises(DataError, match="larger than"):
    data.train_dataset(train, global_batch_size=60001, seed=0)
  with pytest.raises(ValueError):
    data.train_dataset(train, global_batch_size=100, seed=0, process_index=2,
                       process_count=2)
  with pytest.raises(ValueError):
    data.train_dataset(train, global_batch_size=100, seed=0, start_step=-1)


def test_tensorflow_kept_off_gpus(mnist):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  data.train_dataset(mnist["train"], global_batch_size=100, seed=0)
  assert tf.config.get_visible_devices("GPU") == []


# --- Test pipeline -----------------------------------------------------------


def _masked_indices(batches, global_batch_size, process_index, local):
  """Example indices of the rows the mask keeps, from each batch's position."""
  out = []
  for b, batch in enumerate(batches):
    rows = b * global_batch_size + process_index * local + np.arange(local)
    out.append(rows[batch["mask"]])
  return np.concatenate(out)


def test_test_pipeline_covers_everything_once(mnist):
  test = mnist["test"]
  batches = _batches(data.test_dataset(test, global_batch_size=768))
  assert len(batches) == 14  # ceil(10000 / 768)
  for batch in batches:
    assert batch["image"].shape == (768, 28, 28)
    assert batch["mask"].dtype == bool
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 10000 and mask[:10000].all()
  np.testing.assert_array_equal(images[:10000], test.images)
  np.testing.assert_array_equal(labels[:10000], test.labels)
  assert not images[10000:].any() and not labels[10000:].any()


def test_test_pipeline_two_processes(mnist):
  test = mnist["test"]
  g, count = 768, 2
  per_process = [_batches(data.test_dataset(
      test, global_batch_size=g, process_index=p, process_count=count))
                 for p in range(count)]
  assert [len(b) for b in per_process] == [14, 14]
  seen = []
  for p, batches in enumerate(per_process):
    indices = _masked_indices(batches, g, p, g // count)
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(images, test.images[indices])
    np.testing.assert_array_equal(labels, test.labels[indices])
    seen.append(indices)
  union = np.concatenate(seen)
  assert sorted(union.tolist()) == list(range(10000))
  # The last global batch: process 0 holds real rows, process 1 only padding.
  assert per_process[0][-1]["mask"].sum() == 10000 - 13 * g
  assert per_process[1][-1]["mask"].sum() == 0
