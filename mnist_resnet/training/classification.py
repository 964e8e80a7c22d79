"""A classifier's evaluation from its logits, computed once: accuracy, loss,
per-class accuracy, the confusion matrix and calibration. The training
loop's evaluations, results.json, TensorBoard, eval.json and the evaluate
command all take their figures from `metrics_from_logits`.

`loss` is the mean softmax cross-entropy (no label smoothing), in float64;
`accuracy` counts the arg-max. The confusion matrix has the true class in
rows. `expected_calibration_error` is the standard ECE (Guo et al., 2017)
over ECE_BINS equal-width bins of the top softmax probability.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mnist_resnet.data import mnist

ECE_BINS = 15
TOP_CONFUSIONS = 10


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
