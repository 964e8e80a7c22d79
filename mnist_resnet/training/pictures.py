"""Pictures of a trained model, as PNG bytes from numpy arrays.

    confusion_png(matrix)     counts and row-normalised confusion matrix
    errors_png(images, ...)   misclassified digits, in the order given
    curves_png(rows)          loss, accuracy and learning rate per step

Each picture is a `matplotlib.figure.Figure` drawn by the Agg canvas: no
pyplot, so no global figure state and no display, whatever the process's
matplotlib backend. Sizes are fixed in pixels (CONFUSION_SIZE, CURVES_SIZE,
errors_size), so a picture looks the same in a file and in TensorBoard.
"""

from __future__ import annotations

import io
import math
from typing import Any
from typing import Iterable
from typing import Mapping
from typing import Sequence

import numpy as np
import PIL.Image

# Pixels per inch of every figure: sizes below are in inches at this DPI.
DPI = 100

CONFUSION_SIZE = (1000, 450)  # Width, height in pixels.
CURVES_SIZE = (1200, 400)

# The error grid: ERRORS_COLUMNS digits a row, at most MAX_ERROR_DIGITS.
ERRORS_COLUMNS = 8
MAX_ERROR_DIGITS = 64
ERRORS_SCALE = 3  # Picture pixels per digit pixel, each way.
ERRORS_CELL = (110, 120)  # Pixels per digit, with its title above it.
_DIGIT_TOP = 24  # Pixels from a cell's top to its digit: the title's room.
ERRORS_HEADER = 40  # Pixels above the grid for the picture's title.
NO_ERRORS_SIZE = (ERRORS_COLUMNS * ERRORS_CELL[0], 150)


def _figure(size: tuple[int, int], layout: str | None = "constrained"
            ) -> Any:
  """A matplotlib Figure of `size` pixels on the Agg canvas. Constrained
  layout keeps titles and tick labels inside the fixed size."""
  # Imported here: matplotlib (and its font cache) is paid by the runs and
  # tools that draw, not by every importer of the training package.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI,
                  layout=layout)
  FigureCanvasAgg(figure)
  return figure


def _png(figure: Any) -> bytes:
  """The figure as an RGB PNG of exactly its size in pixels."""
  # One draw (savefig draws twice with a layout engine), then Pillow
  # encodes the pixels; the figure is opaque, so RGB without alpha.
  figure.canvas.draw()
  pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3]
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buffer, format="png")
  return buffer.getvalue()


# --- Confusion matrix ---------------------------------------------------------


def confusion_png(matrix: np.ndarray, *, title: str = "") -> bytes:
  """Two panels of a [K, K] confusion matrix (rows true, columns predicted):
  the counts, and each row as a percentage of its true class."""
  matrix = np.asarray(matrix, np.int64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"matrix must be square, got {matrix.shape}")
  rows = matrix.sum(1, keepdims=True)
  percent = 100.0 * matrix / np.maximum(rows, 1)
  figure = _figure(CONFUSION_SIZE)
  if title:
    figure.suptitle(title)
  counts_axes, percent_axes = figure.subplots(1, 2)
  _matrix_panel(counts_axes, matrix, [str(int(c)) for c in matrix.flat],
                "counts", "Blues")
  _matrix_panel(percent_axes, percent,
                [_percent_text(p, c) for p, c in zip(percent.flat,
                                                     matrix.flat)],
                "% of each true class (row-normalised)", "Oranges")
  return _png(figure)


def _percent_text(percent: float, count: int) -> str:
  if count == 0:
    return ""  # Empty cells keep the off-diagonal mistakes easy to spot.
  if percent < 0.5:
    return "<1"  # A few errors are not zero errors.
  return f"{percent:.0f}"


def _matrix_panel(axes: Any, values: np.ndarray, texts: Sequence[str],
                  title: str, cmap: str) -> None:
  k = values.shape[0]
  top = float(values.max()) if values.size else 0.0
  axes.imshow(values, cmap=cmap, vmin=0, vmax=max(top, 1e-9),
              interpolation="nearest")
  for (i, j), text in zip(np.ndindex(values.shape), texts):
    # Light text on the dark cells, dark text elsewhere.
    dark = top > 0 and values[i, j] > 0.55 * top
    # Inside the axes: left out of the layout's bounding boxes (faster).
    axes.text(j, i, text, ha="center", va="center", fontsize=8,
              color="white" if dark else "black", in_layout=False)
  axes.set_title(title, fontsize=10)
  axes.set_xlabel("predicted class")
  axes.set_ylabel("true class")
  axes.set_xticks(range(k))
  axes.set_yticks(range(k))
  axes.tick_params(labelsize=8, length=0)


# --- Misclassified digits -----------------------------------------------------


def errors_size(count: int) -> tuple[int, int]:
  """The size in pixels of errors_png's picture of `count` digits."""
  count = min(count, MAX_ERROR_DIGITS)
  if count == 0:
    return NO_ERRORS_SIZE
  rows = math.ceil(count / ERRORS_COLUMNS)
  return (ERRORS_COLUMNS * ERRORS_CELL[0],
          ERRORS_HEADER + rows * ERRORS_CELL[1])


def errors_png(images: np.ndarray, labels: Sequence[int],
               predicted: Sequence[int], probability: Sequence[float], *,
               title: str = "") -> bytes:
  """A grid of digits (uint8 [N, 28, 28], white on black as in MNIST), the
  first MAX_ERROR_DIGITS in the order given, each titled
  `true -> predicted (probability of the prediction)`."""
  images = np.asarray(images)
  count = min(len(images), MAX_ERROR_DIGITS)
  width, height = errors_size(count)
  # No layout engine: the grid is placed in pixels (one axes per digit and
  # constrained layout take seconds for 64 digits).
  figure = _figure((width, height), layout=None)
  if count == 0:
    figure.text(0.5, 0.5, title or "no misclassified digits", ha="center",
                va="center", fontsize=13)
    return _png(figure)
  if title:
    figure.text(0.5, 1 - 12 / height, title, ha="center", va="top",
                fontsize=11)
  # One image of the whole grid, drawn pixel for pixel: each digit pixel a
  # square of ERRORS_SCALE pixels, so no resampling blurs the digits.
  side = images.shape[1] * ERRORS_SCALE
  paper = np.full((height, width), 255, np.uint8)
  for n in range(count):
    row, column = divmod(n, ERRORS_COLUMNS)
    top = ERRORS_HEADER + row * ERRORS_CELL[1] + _DIGIT_TOP
    left = column * ERRORS_CELL[0] + (ERRORS_CELL[0] - side) // 2
    paper[top:top + side, left:left + side] = (
        images[n].repeat(ERRORS_SCALE, 0).repeat(ERRORS_SCALE, 1))
    figure.text((left + side / 2) / width, 1 - (top - 3) / height,
                f"{int(labels[n])} -> {int(predicted[n])} "
                f"({float(probability[n]):.2f})",
                ha="center", va="bottom", fontsize=9)
  figure.figimage(paper, cmap="gray", vmin=0, vmax=255, origin="upper")
  return _png(figure)


# --- Training curves ----------------------------------------------------------

# (panel title, y label, [(metrics.jsonl key, legend label), ...]). The
# train metrics are those of each logged step's batch (its loss with the
# run's label smoothing); the others are full evaluations.
_CURVE_PANELS = (
    ("loss", "cross-entropy", [("train_loss", "train (batch)"),
                               ("validation_loss", "validation"),
                               ("test_loss", "test")]),
    ("accuracy", "accuracy", [("train_accuracy", "train (batch)"),
                              ("validation_accuracy", "validation"),
                              ("test_accuracy", "test")]),
    ("learning rate", "learning rate", [("learning_rate", None)]),
)
# One colour per split in every panel, whichever splits a run has.
_CURVE_COLOURS = {"train": "C0", "learning": "C0", "validation": "C1",
                  "test": "C2"}


def curve(rows: Iterable[Mapping[str, Any]], key: str
          ) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key` over the rows that hold a finite number for
  it, in step order."""
  points = sorted(
      (int(row["step"]), float(row[key])) for row in rows
      if isinstance(row.get(key), (int, float)) and "step" in row
      and math.isfinite(row[key]))
  if not points:
    return np.zeros(0, np.int64), np.zeros(0)
  steps, values = zip(*points)
  return np.asarray(steps), np.asarray(values)


def curves_png(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> bytes:
  """Loss, accuracy and learning rate against step from metrics.jsonl rows
  ({"step": ..., "train_loss": ..., ...}). Train metrics are lines; the
  evaluations, fewer, are lines with markers."""
  figure = _figure(CURVES_SIZE)
  if title:
    figure.suptitle(title)
  for axes, (name, ylabel, keys) in zip(figure.subplots(1, 3),
                                        _CURVE_PANELS):
    drawn = 0
    for key, label in keys:
      steps, values = curve(rows, key)
      if not len(steps):
        continue
      marker = None if key.startswith(("train_", "learning_")) else "o"
      axes.plot(steps, values, marker=marker, markersize=4, linewidth=1.5,
                label=label, color=_CURVE_COLOURS[key.split("_")[0]])
      drawn += 1
    axes.set_title(name, fontsize=11)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if not drawn:
      axes.text(0.5, 0.5, "no data", ha="center", va="center",
                transform=axes.transAxes, color="grey")
    elif any(label for _, label in keys):
      axes.legend(fontsize=8)
  return _png(figure)
