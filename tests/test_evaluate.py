"""`python -m mnist_resnet.evaluate` on the shared tiny run, and its numbers
on hand-made logits."""

from __future__ import annotations

import concurrent.futures
import fnmatch
import io
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
from PIL import Image
import pytest

from conftest import REPO_ROOT
from mnist_resnet.commands import evaluate
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.core.errors import DataError
from mnist_resnet.data import mnist
from mnist_resnet.training import classification
from mnist_resnet.training import pictures
from mnist_resnet.training import report
from mnist_resnet.training import trained
from mnist_resnet.workdir import metrics as metrics_lib
from mnist_resnet.workdir import rundir
from mnist_resnet.workdir.rundir import RunDirError
from mnist_resnet.workdir.workdir import Workdir

# Runs the command as a user would on an accelerator image: TensorFlow (and
# Keras, Google Cloud's libraries) impossible to import.
NO_TENSORFLOW = textwrap.dedent("""
    import runpy, sys
    sys.path.insert(0, "tests")
    from accelerator_image import AcceleratorImage
    sys.meta_path.insert(0, AcceleratorImage())
    try:
      import tensorflow
      sys.exit("the blocker let tensorflow in")
    except ImportError:
      pass
    sys.argv = ["evaluate", *sys.argv[1:]]
    try:
      runpy.run_module("mnist_resnet.evaluate", run_name="__main__")
    except SystemExit as e:
      loaded = [m for m in sys.modules if m.split(".")[0] == "tensorflow"]
      assert not loaded, loaded
      raise
""")


def run_evaluate(*args: str, block_tensorflow: bool = False
                 ) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  command = ([sys.executable, "-c", NO_TENSORFLOW] if block_tensorflow
             else [sys.executable, "-m", "mnist_resnet.evaluate"])
  return subprocess.run([*command, *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def copy_run(source: pathlib.Path, destination: pathlib.Path
             ) -> pathlib.Path:
  """A copy of a run's workdir, to write into (the shared one stays as it
  was for the other tests)."""
  shutil.copytree(source, destination,
                  ignore=shutil.ignore_patterns("compilation_cache"))
  return destination


def decode(path: pathlib.Path) -> Image.Image:
  Image.open(path).verify()  # Every chunk and CRC.
  return Image.open(path)


# --- The command on a trained run ---------------------------------------------


@pytest.fixture(scope="module")
def run(trained_workdir, tmp_path_factory) -> pathlib.Path:
  return copy_run(trained_workdir, tmp_path_factory.mktemp("eval") / "run")


@pytest.fixture(scope="module")
def evaluated(run, mnist_dir) -> tuple[subprocess.CompletedProcess,
                                      pathlib.Path]:
  """The best checkpoint evaluated by the command, into its default
  directory, TensorFlow blocked."""
  proc = run_evaluate(f"--workdir={run}", "--step=best",
                      f"--data_dir={mnist_dir}", block_tensorflow=True)
  best = json.loads((run / "results.json").read_text())["best_step"]
  return proc, run / f"eval_{best}"


@pytest.fixture(scope="module")
def results(run) -> dict:
  return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def test_labels(mnist_dir) -> np.ndarray:
  return mnist.load_mnist(mnist_dir, check_md5=False)["test"].labels


def test_runs_without_tensorflow(evaluated):
  proc, out = evaluated
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("step 60: accuracy ")
  assert proc.stdout.strip().endswith(f"wrote {out}")
  assert sorted(p.name for p in out.iterdir()) == [
      "confusion.png", "curves.png", "errors.png", "eval.json"]
  # Nothing but warnings on stderr (no read-only notes, no traceback).
  assert "Traceback" not in proc.stderr and "read only" not in proc.stderr


def test_numbers_equal_the_runs_final_evaluation(evaluated, results, run):
  record = json.loads((evaluated[1] / "eval.json").read_text())
  assert record["step"] == results["best_step"]
  assert record["accuracy"] == results["best_test_accuracy"]
  # The tiny run's best checkpoint is its last one: the whole final
  # evaluation of results.json is that of the same checkpoint. (A best
  # before the last, evaluated alone: test_train.py's
  # test_best_checkpoint_is_chosen_on_held_out_validation.)
  assert results["best_step"] == results["step"] == 60
  assert record["workdir"] == str(run)
  assert record["eval_examples"] == results["eval_examples"] == 10000
  assert record["accuracy"] == results["test_accuracy"]
  assert record["loss"] == pytest.approx(results["test_loss"], rel=1e-5)
  # results.json rounds per-class accuracy to 6 decimals.
  assert record["per_class_accuracy"] == pytest.approx(
      results["per_class_accuracy"], abs=5.1e-7)


def test_confusion_matrix_agrees_with_the_labels(evaluated, test_labels):
  record = json.loads((evaluated[1] / "eval.json").read_text())
  matrix = np.array(record["confusion_matrix"])
  assert matrix.shape == (10, 10) and matrix.dtype.kind == "i"
  assert matrix.sum() == 10000
  counts = np.bincount(test_labels, minlength=10)
  assert matrix.sum(axis=1).tolist() == counts.tolist()
  assert record["per_class_count"] == counts.tolist()
  correct = np.round(np.array(record["per_class_accuracy"]) * counts)
  assert np.diag(matrix).tolist() == correct.astype(int).tolist()
  assert record["errors"] == 10000 - np.trace(matrix)
  assert record["accuracy"] == np.trace(matrix) / 10000
  top = record["top_confusions"]
  assert 0 < len(top) <= classification.TOP_CONFUSIONS
  assert [c["count"] for c in top] == sorted(
      (c["count"] for c in top), reverse=True)
  for c in top:
    assert c["true"] != c["predicted"]
    assert matrix[c["true"], c["predicted"]] == c["count"] > 0
  off = matrix - np.diag(np.diag(matrix))
  assert top[0]["count"] == off.max()


def test_calibration_in_eval_json(evaluated):
  record = json.loads((evaluated[1] / "eval.json").read_text())
  bins = record["calibration_bins"]
  assert record["ece_bins"] == len(bins) == 15
  assert sum(b["count"] for b in bins) == 10000
  ece = sum(b["count"] / 10000 * abs(b["accuracy"] - b["confidence"])
            for b in bins if b["count"])
  assert record["expected_calibration_error"] == pytest.approx(ece)
  assert 0 <= record["expected_calibration_error"] <= 1


def test_pictures_decode_at_their_size(evaluated):
  out = evaluated[1]
  record = json.loads((out / "eval.json").read_text())
  sizes = {"confusion.png": pictures.CONFUSION_SIZE,
           "errors.png": pictures.errors_size(record["errors"]),
           "curves.png": pictures.CURVES_SIZE}
  for name, size in sizes.items():
    image = decode(out / name)
    assert (image.format, image.size) == ("PNG", size), name


def test_numbered_step(run, mnist_dir):
  """In this process (it already paid for JAX's import): --step=20 gives
  what the run logged for its evaluation at step 20."""
  early, out = evaluate.evaluate(str(run), "20", data_dir=str(mnist_dir),
                                 out=str(run / "mine"))
  assert out == rundir.workdir_path(run / "mine")
  logged = [json.loads(line) for line in
            (run / "metrics.jsonl").read_text().splitlines()]
  at_20 = next(r for r in logged if r["step"] == 20 and "test_accuracy" in r)
  assert early.record["step"] == 20
  assert early.record["accuracy"] == at_20["test_accuracy"]
  assert early.record["loss"] == pytest.approx(at_20["test_loss"], rel=1e-5)
  assert json.loads((run / "mine" / "eval.json").read_text()) == json.loads(
      rundir.to_json(early.record))
  assert decode(run / "mine" / "confusion.png").size == (
      pictures.CONFUSION_SIZE)


# --- Another device count, while a run trains ---------------------------------

# The three tools in one process with 3 CPU devices (the run trained on 1; 3
# divides no batch, so every last batch is padded): evaluate without a
# data_dir (the run's config.json names it), the logits predict prints its
# probabilities from, and the jax export.
TOOLS_ON_THREE_DEVICES = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from mnist_resnet.commands import evaluate, export
    from mnist_resnet.training import trained
    workdir, out = sys.argv[1:3]
    evaluate.evaluate(workdir, out=out + "/eval")
    model = trained.load(workdir, "latest")
    np.save(out + "/logits.npy",
            model.predict_logits(np.load(out + "/images.npy")))
    export.export(workdir, "latest", out + "/export", ("jax_export",),
                  ("cpu",))
    print(json.dumps({"devices": jax.device_count()}))
""")


def listing(directory: pathlib.Path) -> dict[str, tuple[int, int]]:
  """Every path under `directory`, with its size and modification time."""
  return {str(p.relative_to(directory)): (p.stat().st_size,
                                          p.stat().st_mtime_ns)
          for p in directory.rglob("*")}


def test_the_tools_read_a_live_run_on_another_device_count(
    run, evaluated, results, mnist_dir, tmp_path):
  """With the workdir's lock held, as by a run still training there, and 3
  devices where the run had 1: the same numbers, and nothing in the
  workdir created or changed."""
  images = mnist.load_mnist(mnist_dir, check_md5=False)["test"].images[:200]
  np.save(tmp_path / "images.npy", images)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=3")
  live = Workdir(run)
  live.take_lock()
  try:
    before = listing(run)
    # cwd: not the checkout, where the default config's relative data_dir
    # could be found.
    proc = subprocess.run(
        [sys.executable, "-c", TOOLS_ON_THREE_DEVICES, str(run),
         str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    after = listing(run)
  finally:
    live.release_lock()
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.splitlines()[-1]) == {"devices": 3}
  assert after == before

  record = json.loads((tmp_path / "eval" / "eval.json").read_text())
  one_device = json.loads((evaluated[1] / "eval.json").read_text())
  assert record["step"] == one_device["step"] == results["step"]
  assert record["accuracy"] == one_device["accuracy"] == (
      results["test_accuracy"])
  assert record["confusion_matrix"] == one_device["confusion_matrix"]
  assert record["loss"] == pytest.approx(one_device["loss"], rel=1e-5)
  expected = trained.load(run, "latest").predict_logits(images)
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected,
                             rtol=1e-5, atol=1e-5)
  exported = jax.export.deserialize(bytearray(
      (tmp_path / "export" / "model.jax_export").read_bytes()))
  np.testing.assert_allclose(exported.call(images),
                             classification.softmax(expected), atol=1e-5)


# --- User errors ---------------------------------------------------------------


@pytest.fixture(scope="module")
def no_validation_run(run, tmp_path_factory) -> pathlib.Path:
  """The run's checkpoints with a config that held out no validation split.

  Whether a run has a best checkpoint is decided by its config alone
  (`trained.load` keeps a best one only when validation_examples > 0), and
  the refusal comes before anything is restored: this is what a run
  trained without validation looks like to the command.
  """
  workdir = tmp_path_factory.mktemp("noval") / "run"
  workdir.mkdir()
  config = json.loads((run / "config.json").read_text())
  config["validation_examples"] = 0
  (workdir / "config.json").write_text(json.dumps(config))
  shutil.copytree(run / "checkpoints", workdir / "checkpoints")
  return workdir


@pytest.mark.parametrize("case", ["missing workdir", "no checkpoints",
                                  "step 12345", "step last",
                                  "best without validation", "missing data"])
def test_user_errors(case, run, no_validation_run, mnist_dir, tmp_path):
  """What each user error says (in this process: the command turns these
  errors into one line and exit 2, as the tests below show)."""
  no_checkpoints = tmp_path / "no_checkpoints"
  no_checkpoints.mkdir()
  shutil.copy(run / "config.json", no_checkpoints / "config.json")
  data = str(mnist_dir)
  error, message, call = {
      "missing workdir": (
          RunDirError, f"{tmp_path / 'nothing'}: no such workdir",
          lambda: evaluate.evaluate(str(tmp_path / "nothing"))),
      "no checkpoints": (
          RunDirError, f"{no_checkpoints}/checkpoints holds no checkpoint",
          lambda: evaluate.evaluate(str(no_checkpoints), data_dir=data)),
      "step 12345": (
          RunDirError, f"{run}/checkpoints holds no checkpoint of step "
                       "12345; it holds steps 20, 40, 60",
          lambda: evaluate.evaluate(str(run), "12345", data_dir=data)),
      "step last": (
          ConfigError, "--step='last': must be latest, best or a step number",
          lambda: evaluate.evaluate(str(run), "last", data_dir=data)),
      "best without validation": (
          RunDirError, f"{no_validation_run}/checkpoints has no best "
          "checkpoint: the run held out no validation split "
          "(validation_examples=0); use --step=latest or a step number",
          lambda: evaluate.evaluate(str(no_validation_run), "best",
                                    data_dir=data)),
      "missing data": (
          DataError, f"missing *t10k-images-idx3-ubyte* in {tmp_path}: * or "
                     "pass --data_dir or --download",
          lambda: evaluate.evaluate(str(run), data_dir=str(tmp_path))),
  }[case]
  with pytest.raises(error) as raised:
    call()
  assert fnmatch.fnmatchcase(str(raised.value), message), raised.value
  assert not list(tmp_path.glob("**/eval_*"))


def one_error_line(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("error: ")
  assert proc.stdout == ""
  return lines[0]


def test_the_command_reports_user_errors_in_one_line(run, mnist_dir):
  """Side by side (each is mostly JAX's import): an error raised once the
  checkpoints are open (orbax's read-only notes stay quiet), and one of the
  flags."""
  commands = [[f"--workdir={run}", "--step=12345", f"--data_dir={mnist_dir}"],
              [f"--data_dir={mnist_dir}"]]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    bad_step, no_workdir = pool.map(lambda args: run_evaluate(*args),
                                    commands)
  assert one_error_line(bad_step) == (
      f"error: {run}/checkpoints holds no checkpoint of step 12345; it holds "
      "steps 20, 40, 60")
  assert one_error_line(no_workdir) == (
      "error: flag --workdir=None: Flag --workdir must have a value other "
      "than None.")


# --- Numbers on hand-made logits ---------------------------------------------


def logits_of(probabilities) -> np.ndarray:
  """Logits whose softmax is `probabilities` (rows summing to 1)."""
  return np.log(np.asarray(probabilities, np.float64)).astype(np.float32)


def test_metrics_from_logits_by_hand():
  # Confidence 0.9 (right), 0.62 (wrong), 0.7 and 0.7 (right): with 15 bins
  # of width 1/15 they fall in bins (13/15, 14/15], (9/15, 10/15] and
  # (10/15, 11/15] (twice).
  probabilities = [[0.9, 0.05, 0.05], [0.62, 0.28, 0.1], [0.2, 0.7, 0.1],
                   [0.1, 0.2, 0.7]]
  labels = [0, 1, 1, 2]
  m = classification.metrics_from_logits(logits_of(probabilities), labels)
  assert m["accuracy"] == 0.75
  assert m["eval_examples"] == 4 and m["errors"] == 1
  assert m["loss"] == pytest.approx(
      -(math.log(0.9) + math.log(0.28) + 2 * math.log(0.7)) / 4, rel=1e-6)
  assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
  assert m["per_class_accuracy"] == [1.0, 0.5, 1.0]
  assert m["per_class_count"] == [1, 2, 1]
  assert m["top_confusions"] == [{"true": 1, "predicted": 0, "count": 1}]
  # ECE = 1/4 |1 - 0.9| + 1/4 |0 - 0.62| + 2/4 |1 - 0.7|
  assert m["expected_calibration_error"] == pytest.approx(
      0.025 + 0.155 + 0.15, abs=1e-6)
  bins = m["calibration_bins"]
  assert m["ece_bins"] == len(bins) == 15
  assert [b["count"] for b in bins] == [0] * 9 + [1, 2, 0, 0, 1, 0]
  assert bins[10]["accuracy"] == 1.0
  assert bins[10]["confidence"] == pytest.approx(0.7, abs=1e-6)
  assert bins[9]["accuracy"] == 0.0 and bins[0]["accuracy"] is None
  assert bins[9]["lower"] == pytest.approx(9 / 15)
  assert bins[9]["upper"] == pytest.approx(10 / 15)
  json.loads(rundir.to_json(m))  # Strict JSON.


def test_calibration_bins_are_closed_on_the_right():
  ece, bins = classification.calibration([0.5, 1.0, 0.25], [1, 1, 0], bins=2)
  assert [b["count"] for b in bins] == [2, 1]
  # Bin (0, 0.5]: accuracy 1/2, confidence 0.375; bin (0.5, 1]: 1 and 1.
  assert ece == pytest.approx(2 / 3 * 0.125)


def test_metrics_of_a_perfect_model_and_an_absent_class():
  labels = np.array([0, 1, 1, 3])
  logits = np.eye(4, dtype=np.float32)[labels] * 50
  m = classification.metrics_from_logits(logits, labels)
  assert m["accuracy"] == 1.0 and m["errors"] == 0
  assert m["per_class_accuracy"] == [1.0, 1.0, None, 1.0]
  assert m["top_confusions"] == []
  assert m["expected_calibration_error"] == pytest.approx(0, abs=1e-12)


def test_top_confusions_order_and_limit():
  matrix = np.array([[5, 2, 3], [3, 5, 0], [1, 0, 5]])
  top = classification.top_confusions(matrix, limit=3)
  assert top == [{"true": 0, "predicted": 2, "count": 3},
                 {"true": 1, "predicted": 0, "count": 3},
                 {"true": 0, "predicted": 1, "count": 2}]


def test_worst_errors_first():
  probabilities = classification.softmax(logits_of(
      [[0.6, 0.4], [0.1, 0.9], [0.3, 0.7], [0.95, 0.05], [0.2, 0.8]]))
  labels = np.array([1, 1, 0, 1, 0])
  # Wrong: 0 (0.6 on class 0), 2 (0.7), 3 (0.95), 4 (0.8).
  assert report.worst_errors(probabilities, labels).tolist() == [3, 4, 2, 0]
  assert report.worst_errors(probabilities, labels, limit=2).tolist() == [
      3, 4]


def test_read_metrics_skips_broken_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  # A row cut off by a crash, a JSON value that is no row, random bytes.
  path.write_bytes(b'{"step": 1, "train_loss": 2.0}\n[1, 2]\n\xff\xfe\x00'
                   b'\n{"step": 3, "train_loss": 1.0}\n{"step": 2, "tr')
  rows = metrics_lib.read_metrics(rundir.workdir_path(path))
  assert rows == [{"step": 1, "train_loss": 2.0},
                  {"step": 3, "train_loss": 1.0}]
  assert metrics_lib.read_metrics(
      rundir.workdir_path(tmp_path / "none")) is None


# --- report(): what the training loop calls -----------------------------------


class FakeModel:
  """What report() uses of a TrainedModel, with fixed logits."""

  def __init__(self, workdir, logits, step=7):
    self.workdir, self.step, self._logits = str(workdir), step, logits

  def predict_logits(self, images):
    assert len(images) == len(self._logits)
    return self._logits


def fake_split(n: int, labels) -> mnist.Split:
  return mnist.Split(np.zeros((n, 28, 28), np.uint8),
                     np.asarray(labels, np.int32))


def test_report_writes_only_on_process_0(tmp_path, monkeypatch):
  labels = [0, 1, 2, 3]
  logits = np.eye(10, dtype=np.float32)[[0, 1, 2, 2]] * 5
  model = FakeModel(tmp_path, logits)
  monkeypatch.setattr(report.jax, "process_index", lambda: 1)
  result = report.report(model, fake_split(4, labels), tmp_path / "out")
  assert not (tmp_path / "out").exists()
  assert result.record["errors"] == 1 and result.record["step"] == 7
  assert Image.open(io.BytesIO(result.confusion_png)).size == (
      pictures.CONFUSION_SIZE)


def test_report_without_metrics_or_errors(tmp_path, caplog):
  labels = [3, 1, 4, 1, 5]
  logits = np.eye(10, dtype=np.float32)[labels] * 5
  out = tmp_path / "out"
  result = report.report(FakeModel(tmp_path, logits), fake_split(5, labels),
                           out)
  assert sorted(p.name for p in out.iterdir()) == [
      "confusion.png", "errors.png", "eval.json"]
  assert "metrics.jsonl not found: no curves.png" in caplog.text
  assert decode(out / "errors.png").size == pictures.NO_ERRORS_SIZE
  assert (out / "confusion.png").read_bytes() == result.confusion_png
  assert json.loads((out / "eval.json").read_text())["accuracy"] == 1.0
