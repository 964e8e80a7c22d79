"""Tests for mnist_resnet.data.input_pipeline, against real MNIST.

The training pipeline must follow the reference order in mnist_resnet.data.order
exactly; the test pipeline must visit every example once.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mnist_resnet.core import tf_host
from mnist_resnet.core.errors import DataError
from mnist_resnet.data import input_pipeline
from mnist_resnet.data import mnist
from mnist_resnet.data import order

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def splits(mnist_dir):
  return mnist.load_mnist(mnist_dir)


def _batches(ds, n=None):
  it = ds.as_numpy_iterator()
  return [b for _, b in zip(range(n), it)] if n is not None else list(it)


def test_import_loads_no_tensorflow():
  code = ("import sys, mnist_resnet.data.mnist, mnist_resnet.data.order, "
          "mnist_resnet.data.input_pipeline; "
          "sys.exit('tensorflow' in sys.modules)")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT,
                 env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_pipelines_take_tensorflow_from_tf_host(monkeypatch):
  """Building a pipeline hides the GPUs from TensorFlow first."""
  tf = tf_host.import_tensorflow()
  calls = []
  monkeypatch.setattr(tf_host, "_gpus_hidden", False)
  monkeypatch.setattr(tf.config, "set_visible_devices",
                      lambda *args: calls.append(args))
  split = mnist.Split(np.zeros((10, 28, 28), np.uint8),
                      np.zeros(10, np.int32))
  input_pipeline.train_dataset(split, global_batch_size=5, seed=0)
  assert calls == [([], "GPU")]
  monkeypatch.setattr(tf_host, "_gpus_hidden", False)
  input_pipeline.test_dataset(split, global_batch_size=5)
  assert calls == [([], "GPU")] * 2


# --- Training pipeline -------------------------------------------------------


def test_train_batches_shapes_and_reference_order(splits):
  train = splits["train"]
  ds = input_pipeline.train_dataset(
      train, global_batch_size=128, seed=3, num_steps=5)
  spec = ds.element_spec
  assert spec["image"].shape.as_list() == [None, 28, 28] or \
      spec["image"].shape.as_list() == [128, 28, 28]
  batches = _batches(ds)
  assert len(batches) == 5
  for step, batch in enumerate(batches):
    assert batch["image"].dtype == np.uint8
    assert batch["image"].shape == (128, 28, 28)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (128,)
    ref = order.global_batch_indices(60000, 128, 3, step)
    np.testing.assert_array_equal(batch["image"], train.images[ref])
    np.testing.assert_array_equal(batch["label"], train.labels[ref])


def test_epoch_covers_file_histogram(splits):
  train = splits["train"]
  batches = _batches(input_pipeline.train_dataset(train, global_batch_size=1000,
                                        seed=0, num_steps=60))
  labels = np.concatenate([b["label"] for b in batches])
  assert np.bincount(labels, minlength=10).tolist() == TRAIN_COUNTS
  # Every example exactly once: compare images too, via their sum per class.
  images = np.concatenate([b["image"] for b in batches])
  assert images.astype(np.int64).sum() == train.images.astype(np.int64).sum()


@pytest.mark.parametrize("seed", [0, -1, 2**33 + 5])
def test_pipeline_matches_reference_for_extreme_seeds_and_epochs(seed):
  """The in-graph order equals the numpy reference, high bits included."""
  rng = np.random.default_rng(0)
  split = mnist.Split(rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
                      np.arange(100, dtype=np.int32))
  start = 10 * (2**32 + 3) + 7  # Epoch beyond 2^32, 10 steps per epoch.
  batches = _batches(input_pipeline.train_dataset(
      split, global_batch_size=10, seed=seed,
      start_step=start, num_steps=5))
  for step, batch in enumerate(batches, start=start):
    np.testing.assert_array_equal(
        batch["label"], order.global_batch_indices(100, 10, seed, step))


def test_same_seed_same_batches_other_seed_different(splits):
  train = splits["train"]
  make = lambda seed: _batches(input_pipeline.train_dataset(
      train, global_batch_size=256, seed=seed, num_steps=3))
  a, b, c = make(7), make(7), make(8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["label"], c[0]["label"])


@pytest.mark.parametrize("start_step", [0, 3, 58, 60, 119])
def test_start_step_seeks(splits, start_step):
  train = splits["train"]
  # 60 steps per epoch: 58..61 and 119..122 cross an epoch boundary.
  full = _batches(input_pipeline.train_dataset(
      train, global_batch_size=1000, seed=5,
      num_steps=start_step + 4))
  resumed = _batches(input_pipeline.train_dataset(
      train, global_batch_size=1000, seed=5,
      start_step=start_step, num_steps=4))
  assert len(resumed) == 4
  for x, y in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_infinite_by_default(splits):
  ds = input_pipeline.train_dataset(
      splits["train"], global_batch_size=20000, seed=0,
      start_step=1)
  batches = _batches(ds, 7)  # 3 steps per epoch: crosses two boundaries.
  assert len(batches) == 7
  for step, batch in enumerate(batches, start=1):
    ref = order.global_batch_indices(60000, 20000, 0, step)
    np.testing.assert_array_equal(batch["label"], splits["train"].labels[ref])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_partition_the_global_batch(splits, process_count):
  train = splits["train"]
  g = 1000
  start = 59  # Crosses into epoch 1 after one step.
  whole = _batches(input_pipeline.train_dataset(
      train, global_batch_size=g, seed=1,
      start_step=start, num_steps=3))
  shards = [_batches(input_pipeline.train_dataset(
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
  ref = [order.global_batch_indices(60000, g, 1, s) for s in (60, 61)]
  per_process = [np.concatenate([r[p * (g // process_count):
                                   (p + 1) * (g // process_count)]
                                 for r in ref])
                 for p in range(process_count)]
  union = np.concatenate(per_process)
  assert len(np.unique(union)) == len(union) == 2 * g


def test_train_rejects_bad_sizes(splits):
  train = splits["train"]
  with pytest.raises(DataError, match="does not split evenly"):
    input_pipeline.train_dataset(
        train, global_batch_size=100, seed=0, process_count=3)
  with pytest.raises(ValueError):
    input_pipeline.train_dataset(
        train, global_batch_size=100, seed=0, process_index=2,
        process_count=2)
  with pytest.raises(ValueError):
    input_pipeline.train_dataset(
        train, global_batch_size=100, seed=0, start_step=-1)


# --- Test pipeline -----------------------------------------------------------


def _masked_indices(batches, global_batch_size, process_index, local):
  """Example indices of the rows the mask keeps, from each batch's position."""
  out = []
  for b, batch in enumerate(batches):
    rows = b * global_batch_size + process_index * local + np.arange(local)
    out.append(rows[batch["mask"]])
  return np.concatenate(out)


def test_test_pipeline_covers_everything_once(splits):
  test = splits["test"]
  batches = _batches(input_pipeline.test_dataset(test, global_batch_size=768))
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


def test_test_pipeline_two_processes(splits):
  test = splits["test"]
  g, count = 768, 2
  per_process = [_batches(input_pipeline.test_dataset(
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


# --- Device pipeline -----------------------------------------------------------


def _device_batches(split, *, global_batch_size, seed, start_step, num_steps):
  """The device pipeline's batches, gathered by the jitted function the
  train step uses, on every device of this process."""
  import jax  # pylint: disable=g-import-not-at-top

  from mnist_resnet.core import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh()
  inputs = input_pipeline.device_train_inputs(
      input_pipeline.to_devices(
          split, mesh), global_batch_size=global_batch_size,
      seed=seed, start_step=start_step, mesh=mesh)
  gather = jax.jit(lambda i, s: input_pipeline.gather_train_batch(
      i, s, global_batch_size=global_batch_size, mesh=mesh))
  out = []
  for step in range(start_step, start_step + num_steps):
    batch = gather(next(inputs), np.int32(step))
    assert batch["image"].sharding.is_equivalent_to(
        parallel.batch_sharding(mesh), 3)
    out.append(jax.device_get(batch))
  return out


@pytest.mark.parametrize("start_step", [0, 7])
def test_device_pipeline_gives_the_tf_data_batches(start_step):
  """Same batches as tf.data, across epoch boundaries (10 steps per epoch
  here) and from a resume point."""
  rng = np.random.default_rng(1)
  split = mnist.Split(rng.integers(0, 256, (105, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, 105).astype(np.int32))
  kwargs = dict(global_batch_size=10, seed=3, start_step=start_step,
                num_steps=25)
  device = _device_batches(split, **kwargs)
  host = _batches(input_pipeline.train_dataset(split, **kwargs))
  assert len(device) == len(host) == 25
  for d, h in zip(device, host):
    np.testing.assert_array_equal(d["image"], h["image"])
    np.testing.assert_array_equal(d["label"], h["label"])


def test_device_test_batches_equal_the_test_pipeline():
  """Evaluation on the device sees exactly the tf.data test batches:
  padding rows zero and masked."""
  import jax  # pylint: disable=g-import-not-at-top

  from mnist_resnet.core import parallel  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  split = mnist.Split(rng.integers(0, 256, (23, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, 23).astype(np.int32))
  mesh = parallel.create_mesh()
  on_device = input_pipeline.to_devices(split, mesh)
  gather = jax.jit(lambda d, b: input_pipeline.gather_test_batch(
      d, b, global_batch_size=8, mesh=mesh))
  host = _batches(input_pipeline.test_dataset(split, global_batch_size=8))
  assert len(host) == 3
  for b, expected in enumerate(host):
    got = jax.device_get(gather(on_device, np.int32(b)))
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(got[key], expected[key])
