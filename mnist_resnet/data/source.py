"""The dataset a run trains on, by `config.dataset`.

mnist (the default): the four MNIST idx files in data_dir (data/mnist.py).
tfds:NAME[/CONFIG][:VERSION]: a TensorFlow Datasets dataset prepared in
data_dir (data/tfds_data.py). Both land in the same uint8 arrays, so the two
input pipelines, the held-out split, the order and the evaluation are the
same for either; only reading TFDS needs TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any
from typing import Mapping
from typing import NamedTuple

from mnist_resnet.core.errors import ConfigError
from mnist_resnet.data import mnist
from mnist_resnet.data import tfds_data

IDX = "mnist"


class Loaded(NamedTuple):
  """Both splits, and the TFDS version read (None for the idx files)."""
  splits: dict[str, mnist.Split]
  version: str | None


def check(dataset: str) -> None:
  """ConfigError for a value that names no source, or a TFDS dataset where
  tensorflow-datasets cannot be imported; reads no data."""
  if dataset == IDX:
    return
  if not tfds_data.is_tfds(dataset):
    raise ConfigError(
        f"config.dataset={dataset!r}: expected {IDX} (the four MNIST idx "
        "files in data_dir) or tfds:NAME[/CONFIG][:VERSION] (a TensorFlow "
        "Datasets dataset prepared in data_dir)")
  tfds_data.parse(dataset)
  tfds_data.check_available(dataset)


def load(dataset: str, data_dir: str | os.PathLike, *, download: bool,
         check_md5: bool = True, test_only: bool = False) -> Loaded:
  """{"train": Split, "test": Split} of `dataset`, or the test split alone
  (DataError naming the file or directory when missing, malformed, or
  empty)."""
  if tfds_data.is_tfds(dataset):
    splits, version = tfds_data.load(
        dataset, os.fspath(data_dir), download=download,
        splits=("test",) if test_only else tfds_data.SPLITS)
    return Loaded(splits, version)
  splits = mnist.load_mnist(data_dir, download=download, check_md5=check_md5)
  if test_only:
    splits = {"test": splits["test"]}
  mnist.check_not_empty(splits, data_dir)
  return Loaded(splits, None)


def record(dataset: str, loaded: Loaded,
           splits: Mapping[str, mnist.Split]) -> dict[str, Any]:
  """What results.json says of the data: the dataset, its version, and the
  examples in each split the run used (after the held-out split)."""
  return {"name": dataset, "version": loaded.version,
          "examples": {name: len(s.labels) for name, s in splits.items()}}


def describe(record: Mapping[str, Any]) -> str:
  """A `record` in a few words: "tfds:mnist 3.0.1 (train 60000, test
  10000)"."""
  version = f" {record.get('version')}" if record.get("version") else ""
  sizes = ", ".join(f"{k} {v}" for k, v in
                    dict(record.get("examples") or {}).items())
  return f"{record.get('name')}{version} ({sizes})"
