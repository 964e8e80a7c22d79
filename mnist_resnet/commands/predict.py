"""Predicts the digit in image files with a trained run's model.

    python -m mnist_resnet.predict --workdir=DIR [--step=latest|best|N] \\
        [--save_preprocessed=DIR] FILE...

FILE is an image Pillow reads or an MNIST idx file of uint8 [N, 28, 28]
images. Each image is brought into MNIST's form (`digits.py`); stdout gets
one JSON line per image. docs/trained_model.md#predict-your-own-digits.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterator
from typing import Sequence

from absl import flags
import numpy as np
from PIL import Image

from mnist_resnet.commands import digits as digits_lib
from mnist_resnet.core import cli
from mnist_resnet.core import files
from mnist_resnet.core.errors import EXIT_USER_ERROR
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.data import mnist
from mnist_resnet.training import classification
from mnist_resnet.training import trained

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The training run's workdir (its config.json and "
    "checkpoints).")
_STEP = flags.DEFINE_string(
    "step", "latest", "Checkpoint to use: latest, best (needs a run with "
    "validation_examples > 0) or a step number.")
_SAVE_PREPROCESSED = flags.DEFINE_string(
    "save_preprocessed", None, "Directory to write each image as the model "
    "saw it, a 28x28 PNG named after its file.")
flags.mark_flag_as_required("workdir")

# --------------------------------------------------------------------------
# Arguments


def check_files(paths: Sequence[str]) -> None:
  """Every FILE exists and is a file: a typo is reported before the model
  is loaded, not after."""
  if not paths:
    raise ConfigError("no FILE given: pass one or more images or idx files")
  for path in paths:
    if not os.path.exists(path):
      raise ConfigError(f"{path}: no such file")
    if os.path.isdir(path):
      raise ConfigError(f"{path}: is a directory, not an image or idx file")


# --------------------------------------------------------------------------
# Output


def preprocessed_names(digits: Sequence[digits_lib.Digit]) -> Iterator[str]:
  """A PNG name per digit: the file's stem, '-INDEX' for idx files, and
  '-2', '-3', ... where two inputs share a stem."""
  used: set[str] = set()
  for d in digits:
    stem = os.path.basename(d.file)
    for ext in (".gz", os.path.splitext(stem)[1]):
      if ext and stem.endswith(ext):
        stem = stem[:-len(ext)]
    base = stem if d.index is None else f"{stem}-{d.index}"
    name, n = base, 1
    while name in used:
      n += 1
      name = f"{base}-{n}"
    used.add(name)
    yield name + ".png"


def save_png(path: str, image: np.ndarray) -> None:
  Image.fromarray(image).save(path)  # uint8 [H, W]: 8-bit grey.


def records(digits: Sequence[digits_lib.Digit], logits: np.ndarray,
            saved: Sequence[str] | None = None) -> Iterator[dict]:
  """The JSON object printed for each digit."""
  for i, (d, p) in enumerate(zip(digits, classification.softmax(logits))):
    record = {"file": d.file}
    if d.index is not None:
      record["index"] = d.index
    record["digit"] = int(np.argmax(p))
    record["probabilities"] = [round(float(v), 6) for v in p]
    if saved is not None:
      record["preprocessed"] = saved[i]
    yield record


def main(argv: list[str]) -> None:
  paths = argv[1:]
  save_dir = _SAVE_PREPROCESSED.value
  with cli.user_errors():
    step = trained.parse_step(_STEP.value)
    check_files(paths)
    if save_dir:
      files.check_writable_dir(save_dir, f"--save_preprocessed={save_dir}")
    model = trained.load(_WORKDIR.value, step)
    digits, failed = digits_lib.read_all(paths)
    logits = model.predict_logits(
        np.stack([d.image for d in digits]) if digits
        else np.zeros((0, *mnist.IMAGE_SHAPE), np.uint8))
    saved = None
    if save_dir:
      os.makedirs(save_dir, exist_ok=True)
      saved = [os.path.join(save_dir, name)
               for name in preprocessed_names(digits)]
      for d, path in zip(digits, saved):
        save_png(path, d.image)
  for record in records(digits, logits, saved):
    print(json.dumps(record))
  sys.stdout.flush()
  if failed:
    sys.exit(EXIT_USER_ERROR)


def run() -> None:
  """The command, as `python -m` runs it."""
  cli.run(main)


if __name__ == "__main__":
  run()
