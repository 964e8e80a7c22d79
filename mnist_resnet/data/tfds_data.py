"""A TensorFlow Datasets dataset -> the same uint8 arrays as the idx files.

`config.dataset=tfds:NAME[/CONFIG][:VERSION]` reads TFDS's prepared NAME from
`data_dir` used as TFDS's data_dir, i.e. DATA_DIR/NAME[/CONFIG]/VERSION as
`tfds build`, `tfds.load` or `tfds.dataset_builders.store_as_tfds_dataset`
write it. Any dataset of 28x28x1 uint8 images with a 10-class label serves:
mnist, fashion_mnist, kmnist, emnist/digits. Records are read in their files'
order, so a dataset written in the idx files' order trains exactly as they do.

In a bucket (gs://), the version's directory is copied through etils.epath
(gcsfs, which STORAGE_EMULATOR_HOST points at a local server) into a
temporary directory and read there: TensorFlow's own GCS client, which reads
TFRecords, cannot be pointed anywhere but Cloud Storage. MNIST is 21 MB.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from typing import Any
from typing import NamedTuple

from absl import logging
from etils import epath
import numpy as np

from mnist_resnet.core import files
from mnist_resnet.core import tf_host
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.core.errors import DataError
from mnist_resnet.core.errors import one_line
from mnist_resnet.data import mnist

PREFIX = "tfds:"
SPLITS = ("train", "test")
_INFO_FILE = "dataset_info.json"
# TFDS's own grammar for a dataset: NAME[/CONFIG][:VERSION].
_NAME = re.compile(r"([a-z][a-z0-9_]*)(?:/([A-Za-z0-9_.\-]+))?"
                   r"(?::(\d+\.\d+\.\d+))?")
_VERSION = re.compile(r"\d+\.\d+\.\d+")


class TfdsName(NamedTuple):
  """`tfds:emnist/digits:3.0.0` -> ("emnist", "digits", "3.0.0")."""
  name: str
  config: str | None
  version: str | None

  def __str__(self) -> str:
    text = self.name + (f"/{self.config}" if self.config else "")
    return text + (f":{self.version}" if self.version else "")


def is_tfds(dataset: str) -> bool:
  return isinstance(dataset, str) and dataset.startswith(PREFIX)


def parse(dataset: str) -> TfdsName:
  """The dataset named by `config.dataset` (ConfigError if malformed)."""
  match = _NAME.fullmatch(dataset[len(PREFIX):])
  if match is None:
    raise ConfigError(
        f"config.dataset={dataset!r}: expected tfds:NAME[/CONFIG][:VERSION] "
        "in TFDS's spelling, e.g. tfds:mnist, tfds:emnist/digits:3.0.0")
  return TfdsName(*match.groups())


def check_available(dataset: str) -> None:
  """ConfigError when TFDS or TensorFlow cannot be imported; looks only."""
  for module in ("tensorflow_datasets", "tensorflow"):
    try:
      found = importlib.util.find_spec(module) is not None
    except ImportError:
      found = False
    if not found:
      raise _needs_tfds(dataset, f"No module named {module!r}")


def _needs_tfds(dataset: str, why: object) -> ConfigError:
  return ConfigError(
      f"config.dataset={dataset!r} needs tensorflow-datasets and TensorFlow, "
      f"which cannot be imported here ({one_line(why)}); pip install "
      "tensorflow-datasets tensorflow-cpu, or train on the idx files "
      "(--config.dataset=mnist)")


def _import_tfds(dataset: str) -> Any:
  try:
    tf_host.import_tensorflow()  # First: TensorFlow kept off the GPUs.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _needs_tfds(dataset, e) from None
  return tfds


# --- Where the prepared files are --------------------------------------------


def _prepared_versions(directory: epath.Path) -> list[str]:
  """Versions prepared in DATA_DIR/NAME[/CONFIG], oldest first."""
  try:
    found = [p.name for p in directory.iterdir()
             if _VERSION.fullmatch(p.name) and (p / _INFO_FILE).exists()]
  except (FileNotFoundError, NotADirectoryError):
    return []
  except OSError as e:
    raise DataError(f"{directory}: cannot list: {one_line(e)}") from e
  return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def version_dir(dataset: str, data_dir: str, *, download: bool
                ) -> epath.Path:
  """DATA_DIR/NAME[/CONFIG]/VERSION of `dataset`: the version asked for, or
  the newest one prepared; prepared by TFDS first when allowed."""
  name = parse(dataset)
  base = epath.Path(data_dir) / name.name
  if name.config:
    base = base / name.config
  versions = _prepared_versions(base)
  wanted = name.version or (versions[-1] if versions else None)
  if wanted in versions:
    return base / wanted
  if download:
    return _prepare(dataset, data_dir)
  looked = base / name.version if name.version else base
  found = f" (it holds {', '.join(versions)})" if versions else ""
  raise DataError(
      f"{looked}: {dataset} is not prepared there{found}; prepare it with "
      f"`tfds build {name} --data_dir={data_dir}`, or set "
      "--config.download=true")


def _prepare(dataset: str, data_dir: str) -> epath.Path:
  """TFDS's own preparation (its prepared copy on Cloud Storage when there
  is one, else its download and build) into `data_dir`."""
  tfds = _import_tfds(dataset)
  name = parse(dataset)
  try:
    builder = tfds.builder(str(name), data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{dataset}: {one_line(e)}") from None
  logging.info("Preparing %s in %s", name, data_dir)
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{dataset}: TFDS could not prepare it in {data_dir}: "
                    f"{one_line(e)}") from None
  return epath.Path(builder.data_dir)


def _copy_to_local(source: epath.Path, target: str) -> str:
  """The files of one prepared version (a flat directory) copied to
  `target`; returns it."""
  try:
    for path in source.iterdir():
      if path.is_file():
        (epath.Path(target) / path.name).write_bytes(path.read_bytes())
  except OSError as e:
    raise DataError(f"{source}: cannot copy it here: {one_line(e)}") from e
  return target


# --- Reading -----------------------------------------------------------------


def _feature_keys(info: Any, tfds: Any, where: str) -> tuple[str, str]:
  """The image and the label feature: the supervised keys, else the only
  Image and the only ClassLabel."""
  features = info.features
  if info.supervised_keys and len(info.supervised_keys) == 2:
    image, label = info.supervised_keys
    if isinstance(image, str) and isinstance(label, str):
      return image, label
  images = [k for k, f in features.items()
            if isinstance(f, tfds.features.Image)]
  labels = [k for k, f in features.items()
            if isinstance(f, tfds.features.ClassLabel)]
  if len(images) != 1 or len(labels) != 1:
    raise DataError(
        f"{where}: needs one image feature and one class label; found "
        f"features {sorted(features.keys())}")
  return images[0], labels[0]


def _check_features(info: Any, tfds: Any, where: str,
                    splits: tuple[str, ...]) -> tuple[str, str]:
  image_key, label_key = _feature_keys(info, tfds, where)
  image, label = info.features[image_key], info.features[label_key]
  size = mnist.IMAGE_SIZE
  shape = tuple(image.shape)
  dtype = np.dtype(getattr(image, "np_dtype", None) or image.dtype)
  classes = getattr(label, "num_classes", None)
  if (shape not in ((size, size, 1), (size, size)) or dtype != np.uint8
      or classes != mnist.NUM_CLASSES):
    raise DataError(
        f"{where}: found {dtype} images of shape {list(shape)} with "
        f"{classes} classes; needs {size}x{size}x1 uint8 images and "
        f"{mnist.NUM_CLASSES} classes")
  missing = [s for s in splits if s not in info.splits]
  if missing:
    raise DataError(
        f"{where}: no {' or '.join(repr(s) for s in missing)} split (it "
        f"has: {', '.join(sorted(info.splits.keys()))}); needs "
        f"{' and '.join(repr(s) for s in splits)}")
  return image_key, label_key


def _read_split(builder: Any, tfds: Any, split: str, keys: tuple[str, str],
                where: str) -> mnist.Split:
  """One split whole, in the files' order (one file read at a time)."""
  try:
    data = tfds.as_numpy(builder.as_dataset(
        split=split, batch_size=-1, shuffle_files=False,
        read_config=tfds.ReadConfig(interleave_cycle_length=1)))
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{where}: cannot read the {split} split: "
                    f"{one_line(e)}") from None
  images = np.asarray(data[keys[0]], np.uint8)
  images = images.reshape(images.shape[:3])
  labels = np.asarray(data[keys[1]]).astype(np.int32)
  if not len(labels):
    raise DataError(f"{where}: the {split} split holds 0 images")
  return mnist.Split(images, labels)


def load(dataset: str, data_dir: str, *, download: bool,
         splits: tuple[str, ...] = SPLITS
         ) -> tuple[dict[str, mnist.Split], str]:
  """`splits` of `dataset` and the version read: ({"train": Split,
  "test": Split}, "3.0.1"). Raises DataError naming what is wrong."""
  tfds = _import_tfds(dataset)
  directory = version_dir(dataset, data_dir, download=download)
  with tempfile.TemporaryDirectory(prefix="mnist_resnet_tfds_") as tmp:
    local = (_copy_to_local(directory, tmp) if files.is_remote(directory)
             else os.fspath(directory))
    try:
      builder = tfds.builder_from_directory(local)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"{directory}: not a prepared TFDS dataset: "
                      f"{one_line(e)}") from None
    keys = _check_features(builder.info, tfds, f"{dataset} in {directory}",
                           splits)
    arrays = {s: _read_split(builder, tfds, s, keys, f"{directory}")
              for s in splits}
  return arrays, directory.name
