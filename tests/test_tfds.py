"""TFDS as the second data source, on datasets prepared here offline.

Each dataset is written by TFDS itself (`store_as_tfds_dataset`, the files
`tfds build` writes) from arrays: real MNIST in the idx files' order, and
small datasets for the other names, shapes and splits.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
from test_train import results
from test_train import run_train

from mnist_resnet.core.errors import ConfigError
from mnist_resnet.core.errors import DataError
from mnist_resnet.data import mnist
from mnist_resnet.data import source
from mnist_resnet.data import tfds_data

tfds = pytest.importorskip("tensorflow_datasets")

# A few steps are enough: the same arrays in the same order give the same
# batches from the first step, and any difference changes the parameters.
SHORT_RUN = ("--config.num_train_steps=6", "--config.batch_size=64",
             "--config.log_every_steps=3", "--config.checkpoint_every_steps=6",
             "--config.eval_batch_size=2000")


def write_tfds(data_dir, name, version, splits, *, config=None,
               image_shape=(28, 28, 1), num_classes=10):
  """A TFDS dataset NAME[/CONFIG]:VERSION in data_dir, records in the
  arrays' order; splits: {split: (images, labels)}."""
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=image_shape),
      "label": tfds.features.ClassLabel(num_classes=num_classes)})

  def examples(images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image.reshape(image_shape), "label": int(label)}

  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=version, config=config, features=features,
      data_dir=os.fspath(data_dir), disable_shuffling=True,
      split_datasets={s: examples(*arrays) for s, arrays in splits.items()})


def small(seed, n, shape=(28, 28), classes=10):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, *shape), dtype=np.uint8),
          rng.integers(0, classes, n))


@pytest.fixture(scope="module")
def tfds_dir(mnist_dir, tmp_path_factory):
  """Real MNIST as tfds:mnist:3.0.1 (the idx files' order), emnist/digits
  in two versions, a 32x32x3 dataset and one without a test split."""
  data_dir = tmp_path_factory.mktemp("tfds")
  real = mnist.load_mnist(mnist_dir)
  write_tfds(data_dir, "mnist", "3.0.1",
             {s: (real[s].images, real[s].labels) for s in ("train", "test")})
  for version, seed in (("3.0.0", 1), ("3.1.0", 2)):
    write_tfds(data_dir, "emnist", version, config="digits",
               splits={"train": small(seed, 96), "test": small(seed + 10, 32)})
  write_tfds(data_dir, "colour", "1.0.0", image_shape=(32, 32, 3),
             splits={"train": small(3, 8, (32, 32, 3)),
                     "test": small(4, 8, (32, 32, 3))})
  write_tfds(data_dir, "no_test", "1.0.0",
             splits={"train": small(5, 8), "validation": small(6, 8)})
  return data_dir


@pytest.mark.slow
def test_tfds_mnist_in_the_idx_order_trains_the_idx_run(tfds_dir, mnist_dir,
                                                        tmp_path):
  """Same arrays, same order: the same parameters, bit for bit, through
  train.py; results.json names the dataset, its version and split sizes;
  evaluate reads the same test split. Then a newer version is prepared:
  tfds:mnist would now read it, and the checkpoints' record of the data
  refuses the resume."""
  data = tmp_path / "data"
  (data / "mnist").mkdir(parents=True)
  os.symlink(pathlib.Path(tfds_dir) / "mnist" / "3.0.1",
             data / "mnist" / "3.0.1")
  tfds_args = (f"--config.data_dir={data}", "--config.dataset=tfds:mnist",
               "--config.download=false", *SHORT_RUN)
  run_train(tmp_path / "idx", f"--config.data_dir={mnist_dir}", *SHORT_RUN)
  run_train(tmp_path / "tfds", *tfds_args)
  idx, from_tfds = results(tmp_path / "idx"), results(tmp_path / "tfds")
  assert from_tfds["params_sha256"] == idx["params_sha256"]
  assert from_tfds["test_accuracy"] == idx["test_accuracy"]
  assert from_tfds["dataset"] == {
      "name": "tfds:mnist", "version": "3.0.1",
      "examples": {"train": 60_000, "test": 10_000}}
  assert idx["dataset"] == {
      "name": "mnist", "version": None,
      "examples": {"train": 60_000, "test": 10_000}}
  saved = json.loads((tmp_path / "tfds" / "config.json").read_text())
  assert saved["dataset"] == "tfds:mnist"
  from mnist_resnet.commands import evaluate  # pylint: disable=g-import-not-at-top
  report, _ = evaluate.evaluate(os.fspath(tmp_path / "tfds"),
                                out=os.fspath(tmp_path / "eval"))
  assert report.record["accuracy"] == from_tfds["test_accuracy"]
  assert report.record["eval_examples"] == 10_000

  write_tfds(data, "mnist", "3.1.0",
             {"train": small(7, 96), "test": small(8, 32)})
  proc = run_train(tmp_path / "tfds", *tfds_args,
                   "--config.num_train_steps=12", check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path}/tfds/checkpoints/6 was trained on tfds:mnist "
      "3.0.1 (train 60000, test 10000), this run reads tfds:mnist 3.1.0 "
      "(train 96, test 32): name the version it was trained on "
      "(tfds:NAME:VERSION), or use a new workdir")
  assert sorted(os.listdir(tmp_path / "tfds" / "checkpoints")) == ["6"]


def test_a_name_with_a_config_and_versions(tfds_dir):
  """NAME/CONFIG reads the newest prepared version; :VERSION the one named."""
  newest = source.load("tfds:emnist/digits", tfds_dir, download=False)
  assert newest.version == "3.1.0"
  images, labels = small(2, 96)
  np.testing.assert_array_equal(newest.splits["train"].images, images)
  np.testing.assert_array_equal(newest.splits["train"].labels, labels)
  assert newest.splits["train"].labels.dtype == np.int32
  assert newest.splits["test"].images.shape == (32, 28, 28)
  older = source.load("tfds:emnist/digits:3.0.0", tfds_dir, download=False)
  assert older.version == "3.0.0"
  np.testing.assert_array_equal(older.splits["test"].images, small(11, 32)[0])


def test_a_missing_dataset_is_one_line_exit_2(tfds_dir, tmp_path):
  proc = run_train(tmp_path / "run", f"--config.data_dir={tfds_dir}",
                   "--config.dataset=tfds:fashion_mnist",
                   "--config.download=false", check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last == (f"error: {tfds_dir}/fashion_mnist: tfds:fashion_mnist is "
                  "not prepared there; prepare it with `tfds build "
                  f"fashion_mnist --data_dir={tfds_dir}`, or set "
                  "--config.download=true")
  assert "Traceback" not in proc.stderr


def test_a_version_not_prepared_names_those_that_are(tfds_dir):
  with pytest.raises(DataError, match=r"emnist/digits/9\.0\.0: "
                     r"tfds:emnist/digits:9\.0\.0 is not prepared there "
                     r"\(it holds 3\.0\.0, 3\.1\.0\)"):
    source.load("tfds:emnist/digits:9.0.0", tfds_dir, download=False)


def test_another_image_shape_is_refused(tfds_dir):
  with pytest.raises(DataError, match=r"tfds:colour in .*colour/1\.0\.0: "
                     r"found uint8 images of shape \[32, 32, 3\] with 10 "
                     r"classes; needs 28x28x1 uint8 images and 10 classes"):
    source.load("tfds:colour", tfds_dir, download=False)


def test_a_missing_split_names_the_splits_there(tfds_dir):
  with pytest.raises(DataError, match=r"no 'test' split \(it has: train, "
                     r"validation\); needs 'train' and 'test'"):
    source.load("tfds:no_test", tfds_dir, download=False)


@pytest.mark.parametrize("value", [
    "tfds:", "tfds:Mnist", "tfds:mnist:3", "tfds:mnist/:1.0.0",
    "tfds:mnist:1.0.0:2", "mnist2", "tfds"])
def test_a_malformed_dataset_is_refused_before_anything_runs(value):
  with pytest.raises(ConfigError, match=r"^config\.dataset="):
    source.check(value)


def test_names_in_tfds_spelling_are_parsed():
  assert tfds_data.parse("tfds:emnist/digits:3.0.0") == (
      "emnist", "digits", "3.0.0")
  assert tfds_data.parse("tfds:fashion_mnist") == (
      "fashion_mnist", None, None)
  assert str(tfds_data.parse("tfds:emnist/digits")) == "emnist/digits"


def test_without_tfds_installed_it_is_one_line(tmp_path):
  """On an image without TensorFlow, a tfds: dataset is refused before
  anything runs; the idx files need no TensorFlow (test_train's)."""
  proc = run_train(tmp_path / "run", f"--config.data_dir={tmp_path}",
                   "--config.dataset=tfds:mnist",
                   "--config.input_pipeline=device", check=False,
                   without_tensorflow=True)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: config.dataset='tfds:mnist' needs tensorflow-datasets and "
      "TensorFlow, which cannot be imported here")


def test_a_dataset_in_a_bucket_reads_as_the_local_one(tfds_dir, gcs_bucket):
  """gs://: the version's files come through epath (gcsfs, pointed at the
  local Cloud Storage server), the arrays are those of the local copy."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  local = pathlib.Path(tfds_dir) / "emnist" / "digits"
  remote = epath.Path(gcs_bucket) / "tfds" / "emnist" / "digits"
  for path in local.rglob("*"):
    if path.is_file():
      (remote / path.relative_to(local)).write_bytes(path.read_bytes())
  from_bucket = source.load("tfds:emnist/digits", f"{gcs_bucket}/tfds",
                            download=False)
  from_disk = source.load("tfds:emnist/digits", tfds_dir, download=False)
  assert from_bucket.version == "3.1.0"
  for split in ("train", "test"):
    np.testing.assert_array_equal(from_bucket.splits[split].images,
                                  from_disk.splits[split].images)
    np.testing.assert_array_equal(from_bucket.splits[split].labels,
                                  from_disk.splits[split].labels)
  with pytest.raises(DataError, match=rf"^{gcs_bucket}/tfds/kmnist: "
                     "tfds:kmnist is not prepared there"):
    source.load("tfds:kmnist", f"{gcs_bucket}/tfds", download=False)


def test_inspect_data_describes_a_tfds_dataset(tfds_dir):
  from mnist_resnet.commands import inspect_data  # pylint: disable=g-import-not-at-top
  report = inspect_data.inspect(os.fspath(tfds_dir),
                                dataset="tfds:emnist/digits:3.0.0")
  assert report["version"] == "3.0.0"
  assert report["splits"]["train"]["examples"] == 96
  assert report["splits"]["test"]["image_shape"] == [28, 28]

