"""Check a dataset before a long run, and describe what is in it.

    python -m mnist_resnet.inspect_data --data_dir=data/mnist
    python -m mnist_resnet.inspect_data --dataset=tfds:fashion_mnist --data_dir=~/tensorflow_datasets

Reads and validates the data exactly as training does (the four idx files,
or a prepared TFDS dataset) and prints one JSON object: per split the
example count, image shape, label histogram and mean pixel value; for the
idx files, per file its path, md5 and whether its content is the official
MNIST file (a rebuilt or modified copy loads fine but says false here); for
TFDS, the version read. A missing or broken file, or a split with no images
(which training refuses too), is one `error: ...` line on stderr and exit
code 2. Nothing is downloaded unless --download is given.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from absl import flags
import numpy as np

from mnist_resnet.core import cli
from mnist_resnet.data import mnist
from mnist_resnet.data import source

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Directory with the four MNIST idx files (.gz or not), "
    "or TFDS's data_dir for --dataset=tfds:...")
_DATASET = flags.DEFINE_string(
    "dataset", source.IDX, "mnist (the idx files) or "
    "tfds:NAME[/CONFIG][:VERSION], as config.dataset.")
_DOWNLOAD = flags.DEFINE_bool(
    "download", False, "Fetch missing files from the MNIST mirrors first.")
flags.mark_flag_as_required("data_dir")


def inspect(data_dir: str, *, download: bool = False,
            dataset: str = source.IDX) -> dict[str, Any]:
  """The report printed by this tool, as a dict (raises DataError)."""
  source.check(dataset)
  if dataset != source.IDX:
    loaded = source.load(dataset, data_dir, download=download)
    return {"dataset": dataset, "version": loaded.version,
            "data_dir": data_dir, "splits": _describe(loaded.splits)}
  paths = mnist.locate_files(data_dir, download=download,
                             download_hint="pass --download")
  # Checksums are reported in the output; no warnings on stderr for them.
  splits = mnist.load_mnist(data_dir, download=False, check_md5=False)
  # An empty split has no mean pixel (NaN is not JSON), and training
  # rejects it: say so here, the check before a long run.
  mnist.check_not_empty(splits, data_dir)
  report: dict[str, Any] = {"data_dir": str(pathlib.Path(data_dir)),
                            "splits": _describe(splits), "files": {}}
  for name, (md5, official) in mnist.checksum_details(paths).items():
    report["files"][name] = {"path": str(paths[name]), "md5": md5,
                             "matches_official": official}
  return report


def _describe(splits: dict[str, mnist.Split]) -> dict[str, Any]:
  return {name: {
      "examples": int(len(split.labels)),
      "image_shape": list(split.images.shape[1:]),
      "label_histogram": [int(c) for c in np.bincount(
          split.labels, minlength=mnist.NUM_CLASSES)],
      "pixel_mean": round(float(split.images.mean(dtype=np.float64)), 4),
  } for name, split in splits.items()}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  with cli.user_errors():
    report = inspect(_DATA_DIR.value, download=_DOWNLOAD.value,
                     dataset=_DATASET.value)
  print(json.dumps(report), flush=True)


def run() -> None:
  """The command, as `python -m` runs it."""
  cli.run(main)


if __name__ == "__main__":
  run()
