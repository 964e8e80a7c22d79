"""A trained model's evaluation report: every test digit once, as numbers
(eval.json) and pictures (confusion.png, errors.png, curves.png).

The numbers are classification.metrics_from_logits'. A training run writes
this report at its end from its final evaluation's logits and figures;
`python -m mnist_resnet.evaluate` writes it for any checkpoint.
"""

from __future__ import annotations

import os
from typing import Any
from typing import NamedTuple

from absl import logging
import jax
import numpy as np

from mnist_resnet.data import mnist
from mnist_resnet.training import classification
from mnist_resnet.training import pictures
from mnist_resnet.training import trained as trained_lib
from mnist_resnet.workdir import metrics as metrics_lib
from mnist_resnet.workdir import rundir
from mnist_resnet.workdir.workdir import Workdir

EVAL_JSON = "eval.json"
CONFUSION_PNG = "confusion.png"
ERRORS_PNG = "errors.png"
CURVES_PNG = "curves.png"

# The TensorBoard image tag a training run gives the confusion picture.
CONFUSION_TAG = "test_confusion_matrix"


def worst_errors(probabilities: np.ndarray, labels: np.ndarray,
                 limit: int = pictures.MAX_ERROR_DIGITS) -> np.ndarray:
  """Indices of the misclassified examples, highest probability on the
  wrong class first (ties: lowest index first), at most `limit`."""
  predicted = probabilities.argmax(axis=1)
  wrong = np.flatnonzero(predicted != labels)
  confidence = probabilities[wrong, predicted[wrong]]
  return wrong[np.argsort(-confidence, kind="stable")][:limit]


# --- Files --------------------------------------------------------------------


class Report(NamedTuple):
  """What `report` returns: eval.json's record, and confusion.png's bytes
  (for TensorBoard: `Reporter.image(step, CONFUSION_TAG, confusion_png)`)."""
  record: dict[str, Any]
  confusion_png: bytes


def report(trained: trained_lib.TrainedModel, split: mnist.Split,
           out_dir: str | os.PathLike,
           metrics_path: str | os.PathLike | None = None,
           logits: np.ndarray | None = None,
           figures: dict[str, Any] | None = None) -> Report:
  """Evaluates `trained` on every example of `split` once and writes
  eval.json, confusion.png, errors.png and curves.png into `out_dir`.
  `logits` and `figures`: the model's logits of `split` and their
  `classification.metrics_from_logits`, already computed (a run has them
  from its final evaluation); None computes them here.

  Every process of a multi-process run must call it (the prediction is one
  SPMD computation, its logits replicated to every process); all compute
  the same record, and only process 0 writes files. `metrics_path`: the
  metrics.jsonl for curves.png (default: the workdir's); a missing file
  skips that picture with a warning.
  """
  workdir = Workdir(trained.workdir)
  if logits is None:
    logits = trained.predict_logits(split.images)
  labels = np.asarray(split.labels, np.int64)
  record = {
      "workdir": os.fspath(workdir.path),
      "step": trained.step,
      **(figures if figures is not None
         else classification.metrics_from_logits(logits, labels)),
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
                      _errors_picture(split, classification.softmax(logits),
                                      labels, record))
  if metrics_path is None:
    metrics_path = workdir.metrics_file
  metrics_path = rundir.workdir_path(metrics_path)
  rows = metrics_lib.read_metrics(metrics_path)
  if rows is None:
    logging.warning("%s not found: no %s", metrics_path, CURVES_PNG)
  else:
    name = workdir.path.name
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
