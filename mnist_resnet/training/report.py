"""A trained model's evaluation report: every test digit once, as numbers
(eval.json) and pictures (confusion.png, errors.png, curves.png).

Numbers (`metrics_from_logits`): `loss` is the mean softmax cross-entropy
of the logits (no label smoothing), `accuracy` counts the arg-max. The
confusion matrix has the true class in rows and the predicted class in
columns. `expected_calibration_error` is the standard ECE (Guo et al., 2017)
over ECE_BINS equal-width bins of the confidence (the top softmax
probability). A training run writes this report at its end from its final
evaluation's logits; `python -m mnist_resnet.evaluate` writes it for any
checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any
from typing import NamedTuple

from absl import logging
from etils import epath
import jax
import numpy as np

from mnist_resnet.data import mnist
from mnist_resnet.training import pictures
from mnist_resnet.training import trained as trained_lib
from mnist_resnet.workdir import rundir

ECE_BINS = 15
TOP_CONFUSIONS = 10

EVAL_JSON = "eval.json"
CONFUSION_PNG = "confusion.png"
ERRORS_PNG = "errors.png"
CURVES_PNG = "curves.png"

# The TensorBoard image tag a training run gives the confusion picture.
CONFUSION_TAG = "test_confusion_matrix"


# --- Numbers ------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise softmax in float64 (float32 logits lose nothing)."""
  x = np.asarray(logits, np.float64)
  x = np.exp(x - x.max(axis=1, keepdims=True))
  return x / x.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per-example softmax cross-entropy, in float64."""
  x = np.asarray(logits, np.float64)
  top = x.max(axis=1)
  log_sum = np.log(np.exp(x - top[:, None]).sum(axis=1)) + top
  return log_sum - x[np.arange(len(x)), labels]


def calibration(confidence: np.ndarray, correct: np.ndarray,
                bins: int = ECE_BINS) -> tuple[float, list[dict[str, Any]]]:
  """Expected calibration error over `bins` equal-width bins of (0, 1]
  (bin m: ((m-1)/bins, m/bins]), and each bin's count, accuracy and mean
  confidence (null for an empty bin)."""
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct, np.float64)
  edges = np.linspace(0.0, 1.0, bins + 1)
  # right=True: a confidence on an edge belongs to the bin it closes.
  index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0,
                  bins - 1)
  ece, table = 0.0, []
  for m in range(bins):
    inside = index == m
    count = int(inside.sum())
    accuracy = float(correct[inside].mean()) if count else None
    mean_confidence = float(confidence[inside].mean()) if count else None
    if count:
      ece += count / len(confidence) * abs(accuracy - mean_confidence)
    table.append({"lower": float(edges[m]), "upper": float(edges[m + 1]),
                  "count": count, "accuracy": accuracy,
                  "confidence": mean_confidence})
  return float(ece), table


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray,
                     classes: int = mnist.NUM_CLASSES) -> np.ndarray:
  """[classes, classes] int64 counts: rows true, columns predicted."""
  matrix = np.zeros((classes, classes), np.int64)
  np.add.at(matrix, (labels, predicted), 1)
  return matrix


def top_confusions(matrix: np.ndarray, limit: int = TOP_CONFUSIONS
                   ) -> list[dict[str, int]]:
  """The off-diagonal cells with a count, most frequent first (ties: by
  true class, then predicted class)."""
  cells = [(-int(matrix[t, p]), t, p) for t, p in np.ndindex(matrix.shape)
           if t != p and matrix[t, p] > 0]
  return [{"true": t, "predicted": p, "count": -c}
          for c, t, p in sorted(cells)[:limit]]


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray
                        ) -> dict[str, Any]:
  """Every number of eval.json from float [N, K] logits and int [N] labels."""
  logits = np.asarray(logits)
  labels = np.asarray(labels, np.int64)
  if logits.ndim != 2 or len(logits) != len(labels):
    raise ValueError(f"logits {logits.shape} do not match labels "
                     f"{labels.shape}")
  classes = logits.shape[1]
  probabilities = softmax(logits)
  predicted = probabilities.argmax(axis=1)
  correct = predicted == labels
  matrix = confusion_matrix(labels, predicted, classes)
  class_counts = matrix.sum(axis=1)
  ece, bins = calibration(probabilities.max(axis=1), correct)
  n = len(labels)
  return {
      "accuracy": float(correct.mean()) if n else float("nan"),
      "loss": float(cross_entropy(logits, labels).mean()) if n
              else float("nan"),
      "eval_examples": n,
      "errors": int(n - correct.sum()),
      "per_class_accuracy": [
          float(matrix[k, k] / class_counts[k]) if class_counts[k]
          else None for k in range(classes)],
      "per_class_count": [int(c) for c in class_counts],
      "confusion_matrix": matrix.tolist(),
      "top_confusions": top_confusions(matrix),
      "expected_calibration_error": ece,
      "ece_bins": ECE_BINS,
      "calibration_bins": bins,
  }


def worst_errors(probabilities: np.ndarray, labels: np.ndarray,
                 limit: int = pictures.MAX_ERROR_DIGITS) -> np.ndarray:
  """Indices of the misclassified examples, highest probability on the
  wrong class first (ties: lowest index first), at most `limit`."""
  predicted = probabilities.argmax(axis=1)
  wrong = np.flatnonzero(predicted != labels)
  confidence = probabilities[wrong, predicted[wrong]]
  return wrong[np.argsort(-confidence, kind="stable")][:limit]


# --- Files --------------------------------------------------------------------


def read_metrics(path: epath.Path) -> list[dict[str, Any]] | None:
  """The rows of a metrics.jsonl; None if there is no such file. A line that
  is not a JSON object with a step (cut off by a crash) is skipped."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  rows = []
  for line in text.splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    if isinstance(row, dict) and "step" in row:
      rows.append(row)
    elif line.strip():
      logging.warning("%s: skipped a line that is not a metrics row: %.80r",
                      path, line)
  return rows


class Report(NamedTuple):
  """What `report` returns: eval.json's record, and confusion.png's bytes
  (for TensorBoard: `Reporter.image(step, CONFUSION_TAG, confusion_png)`)."""
  record: dict[str, Any]
  confusion_png: bytes


def report(trained: trained_lib.TrainedModel, split: mnist.Split,
           out_dir: str | os.PathLike,
           metrics_path: str | os.PathLike | None = None,
           logits: np.ndarray | None = None) -> Report:
  """Evaluates `trained` on every example of `split` once and writes
  eval.json, confusion.png, errors.png and curves.png into `out_dir`.
  `logits`: the model's logits of `split`, already computed (train.py has
  them from its final evaluation); None computes them here.

  Every process of a multi-process run must call it (the prediction is one
  SPMD computation, its logits replicated to every process); all compute
  the same record, and only process 0 writes files. `metrics_path`: the
  metrics.jsonl for curves.png (default: the workdir's); a missing file
  skips that picture with a warning.
  """
  if logits is None:
    logits = trained.predict_logits(split.images)
  labels = np.asarray(split.labels, np.int64)
  record = {
      "workdir": os.fspath(rundir.workdir_path(trained.workdir)),
      "step": trained.step,
      **metrics_from_logits(logits, labels),
  }
  confusion = pictures.confusion_png(
      np.asarray(record["confusion_matrix"]),
      title=f"step {trained.step}: accuracy {record['accuracy']:.2%} on "
            f"{record['eval_examples']:,} digits")
  if jax.process_index() != 0:
    return Report(record, confusion)
  out = rundir.workdir_path(out_dir)
  rundir.write_atomic(out / EVAL_JSON, rundir.to_json(record))
  rundir.write_atomic(out / CONFUSION_PNG, confusion)
  rundir.write_atomic(out / ERRORS_PNG,
                      _errors_picture(split, softmax(logits), labels, record))
  if metrics_path is None:
    metrics_path = rundir.workdir_path(trained.workdir) / "metrics.jsonl"
  metrics_path = rundir.workdir_path(metrics_path)
  rows = read_metrics(metrics_path)
  if rows is None:
    logging.warning("%s not found: no %s", metrics_path, CURVES_PNG)
  else:
    name = rundir.workdir_path(trained.workdir).name
    last = max((r["step"] for r in rows), default=None)
    rundir.write_atomic(out / CURVES_PNG, pictures.curves_png(
        rows, title=f"{name}: training metrics up to step {last}"
        if rows else f"{name}: metrics.jsonl holds no rows yet"))
  return Report(record, confusion)


def _errors_picture(split: mnist.Split, probabilities: np.ndarray,
                    labels: np.ndarray, record: dict[str, Any]) -> bytes:
  worst = worst_errors(probabilities, labels)
  predicted = probabilities[worst].argmax(axis=1)
  errors = record["errors"]
  if errors == 0:
    title = (f"step {record['step']}: no misclassified digits among "
             f"{record['eval_examples']:,}")
  else:
    shown = (f"all {errors}" if len(worst) == errors
             else f"{len(worst)} of {errors:,}")
    title = (f"step {record['step']}: {shown} misclassified digits, most "
             "confident first; true -> predicted (probability)")
  return pictures.errors_png(
      split.images[worst], labels[worst], predicted,
      probabilities[worst, predicted], title=title)
