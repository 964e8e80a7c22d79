"""Evaluates a trained model on its dataset's test set: numbers and pictures.

    python -m mnist_resnet.evaluate --workdir=DIR [--step=latest|best|N] \\
        [--data_dir=DIR] [--download] [--out=DIR]

Restores one checkpoint of the run in DIR (`trained.load`), predicts each of
the 10,000 test digits once and writes eval.json, confusion.png, errors.png
and curves.png into --out (default DIR/eval_<step>), leaving the run's own
files untouched. What each holds: docs/trained_model.md#evaluate-a-checkpoint.
"""

from __future__ import annotations

from typing import Any

from absl import flags
from absl import logging
from etils import epath

from mnist_resnet.core import cli
from mnist_resnet.core.errors import DataError
from mnist_resnet.data import mnist
from mnist_resnet.data import source
from mnist_resnet.training import report as report_lib
from mnist_resnet.training import trained as trained_lib
from mnist_resnet.workdir import rundir
from mnist_resnet.workdir.workdir import Workdir


def evaluate(workdir: str, step: str = "latest", *, data_dir: str | None = None,
             download: bool = False, out: str | None = None
             ) -> tuple[report_lib.Report, epath.Path]:
  """What the command does, as a function: the report and where it went
  (raises MnistResnetError)."""
  # The config and the data files first: a missing one is reported before
  # anything is restored or compiled.
  trained_lib.parse_step(step)
  config = trained_lib.read_config(workdir)
  data_dir = data_dir or config.get("data_dir", "")
  if not data_dir:
    raise DataError(f"{Workdir(workdir).config_file} names no data_dir: pass "
                    "--data_dir")
  dataset = config.get("dataset", source.IDX)
  if dataset == source.IDX:
    paths = mnist.locate_files(data_dir, download=download,
                               download_hint="pass --data_dir or --download")
    _warn_if_not_official({name: paths[name] for name in (
        mnist.TEST_IMAGES, mnist.TEST_LABELS)})
  source.check(dataset)
  test = source.load(dataset, data_dir, download=download, check_md5=False,
                     test_only=True).splits["test"]
  model = trained_lib.load(workdir, step)
  out_dir = (rundir.workdir_path(out) if out
             else Workdir(workdir).eval_dir(model.step))
  return report_lib.report(model, test, out_dir), out_dir


def _warn_if_not_official(paths: dict[str, Any]) -> None:
  # Numbers on another test set compare with no one's; the training split
  # (a rebuilt copy is legitimate there) plays no part here.
  for name, (md5, official) in mnist.checksum_details(paths).items():
    if official is False:
      logging.warning("%s: md5 %s is not that of the official MNIST file: "
                      "these numbers are not comparable with published ones",
                      paths[name], md5)


def _define_flags() -> None:
  # Only when run as a program: train.py defines --workdir too, and may
  # import this module for `report`.
  flags.DEFINE_string("workdir", None, "The training run's directory (or "
                      "gs://BUCKET/PATH).")
  flags.DEFINE_string("step", "latest", "Checkpoint to evaluate: latest, "
                      "best (by validation accuracy) or a step number.")
  flags.DEFINE_string("data_dir", None, "Directory with the MNIST idx files, "
                      "or TFDS's data_dir for a run on a tfds: dataset "
                      "(default: the run's config.data_dir).")
  flags.DEFINE_bool("download", False, "Fetch missing MNIST files from the "
                    "mirrors first.")
  flags.DEFINE_string("out", None, "Where the report goes (default: "
                      "WORKDIR/eval_<step>).")
  flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  with cli.user_errors():
    result, out_dir = evaluate(f.workdir, f.step, data_dir=f.data_dir,
                               download=f.download, out=f.out)
  r = result.record
  print(f"step {r['step']}: accuracy {r['accuracy']:.4f} ({r['errors']} "
        f"errors in {r['eval_examples']}), loss {r['loss']:.4f}, "
        f"ECE {r['expected_calibration_error']:.4f}; wrote {out_dir}",
        flush=True)


def run() -> None:
  """The command, as `python -m` runs it."""
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
