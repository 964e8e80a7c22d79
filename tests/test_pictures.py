"""The pictures of a trained model: PNGs of the promised size, whatever the
input (no errors, many errors, metrics missing or not finite)."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import REPO_ROOT
from mnist_resnet.training import pictures


def decode(png: bytes) -> Image.Image:
  """The image, after Pillow checked the whole file (CRCs, chunks)."""
  Image.open(io.BytesIO(png)).verify()
  image = Image.open(io.BytesIO(png))
  image.load()
  return image


def digits(n: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)


def test_confusion_png_size():
  matrix = np.arange(100).reshape(10, 10)
  assert decode(pictures.confusion_png(matrix, title="t")).size == (
      pictures.CONFUSION_SIZE)


def test_confusion_png_of_an_empty_matrix():
  # No examples at all: still a picture, no division by zero.
  assert decode(pictures.confusion_png(np.zeros((10, 10)))).size == (
      pictures.CONFUSION_SIZE)


def test_confusion_png_rejects_a_non_square_matrix():
  with pytest.raises(ValueError, match="square"):
    pictures.confusion_png(np.zeros((10, 9)))


def test_percent_text():
  assert pictures._percent_text(0.0, 0) == ""
  assert pictures._percent_text(0.1, 1) == "<1"
  assert pictures._percent_text(97.6, 500) == "98"


@pytest.mark.parametrize("count, rows", [(1, 1), (8, 1), (9, 2), (64, 8),
                                         (200, 8)])
def test_errors_png_grid_size(count, rows):
  png = pictures.errors_png(digits(count), [7] * count, [2] * count,
                            np.linspace(1, 0.5, count), title="t")
  width, height = decode(png).size
  assert (width, height) == pictures.errors_size(count)
  assert width == pictures.ERRORS_COLUMNS * pictures.ERRORS_CELL[0]
  assert height == pictures.ERRORS_HEADER + rows * pictures.ERRORS_CELL[1]


def test_errors_png_without_errors():
  png = pictures.errors_png(np.zeros((0, 28, 28), np.uint8), [], [], [])
  assert decode(png).size == pictures.NO_ERRORS_SIZE


def test_errors_png_shows_digits_white_on_black():
  """An MNIST digit is ink 255 on background 0: drawn as it is, the ink
  white and the background black."""
  image = np.zeros((1, 28, 28), np.uint8)
  image[0, 10:18, 4:24] = 255  # A wide white bar across the middle.
  png = pictures.errors_png(image, [1], [7], [0.9])
  grey = np.asarray(decode(png).convert("L"), np.int64)
  cell = grey[pictures.ERRORS_HEADER:, :pictures.ERRORS_CELL[0]]
  assert (cell < 20).sum() > 1000  # The black background of the digit.
  assert (cell > 235).sum() > 1000  # White paper around it, and the bar.
  # The digit's centre row is the bar: white on the black square.
  rows = np.flatnonzero((cell < 20).sum(axis=1) > 40)
  middle = cell[(rows[0] + rows[-1]) // 2]
  assert (middle > 235).sum() > 40 and (middle < 20).sum() > 5


def test_curves_png_size_and_partial_metrics():
  rows = [{"step": 10, "train_loss": 2.0, "train_accuracy": 0.3,
           "learning_rate": 0.1},
          {"step": 20, "train_loss": float("nan"), "learning_rate": 0.2},
          {"step": 20, "test_accuracy": 0.5, "test_loss": 1.5}]
  assert decode(pictures.curves_png(rows, title="t")).size == (
      pictures.CURVES_SIZE)
  assert decode(pictures.curves_png([])).size == pictures.CURVES_SIZE


def test_curve_keeps_finite_numbers_in_step_order():
  rows = [{"step": 30, "x": 3.0}, {"step": 10, "x": 1.0},
          {"step": 20, "x": None}, {"step": 25, "x": float("inf")},
          {"step": 40}, {"x": 5.0}]
  steps, values = pictures.curve(rows, "x")
  assert steps.tolist() == [10, 30] and values.tolist() == [1.0, 3.0]


def test_no_pyplot():
  """Figures are drawn without pyplot: no global state, no display."""
  script = ("import sys; import numpy as np; "
            "from mnist_resnet.training import pictures; "
            "pictures.confusion_png(np.eye(10)); "
            "assert 'matplotlib.pyplot' not in sys.modules")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
