"""The run's own record on disk decides, through train.py: a missing or
damaged config.json, a damaged results.json, a signal during the end-of-run
report, a workdir that disappears during a save."""

from __future__ import annotations

import json
import pathlib
import shutil
import signal

import pytest
from test_preemption import INTERRUPTED
from test_preemption import checkpoint_steps
from test_preemption import start_train
from test_preemption import wait_for
from test_train import results
from test_train import run_train

from conftest import CACHE_FLAG

# The reproduction: 30 steps, a checkpoint every 10.
ARGS = ("--config.download=false", "--config.num_train_steps=30",
        "--config.eval_every_steps=100000",
        "--config.checkpoint_every_steps=10", "--config.log_every_steps=10")


@pytest.fixture(scope="module")
def finished(mnist_dir, tmp_path_factory) -> pathlib.Path:
  """A finished run, copied by each test that changes it."""
  workdir = tmp_path_factory.mktemp("finished")
  run_train(workdir, f"--config.data_dir={mnist_dir}", *ARGS)
  return workdir


def copy_of(finished, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  return workdir


def one_line_error(proc) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), proc.stderr[-3000:]
  return last


def test_without_config_json_a_changed_config_is_refused(
    finished, mnist_dir, tmp_path):
  """config.json deleted: the checkpoints' config refuses a resume with
  another learning rate, and a finished run another seed (it once resumed
  with the new value, and answered the seed with the old run's results);
  config.json is written again from the checkpoint."""
  workdir = copy_of(finished, tmp_path)
  original = json.loads((workdir / "config.json").read_text())
  (workdir / "config.json").unlink()
  proc = run_train(workdir, f"--config.data_dir={mnist_dir}", *ARGS,
                   "--config.num_train_steps=40",
                   "--config.learning_rate=0.05", check=False)
  line = one_line_error(proc)
  assert "checkpoints/30 holds another run: learning_rate 0.4 -> 0.05" in line
  assert checkpoint_steps(workdir) == [10, 20, 30]
  assert json.loads((workdir / "config.json").read_text()) == original

  (workdir / "config.json").unlink()
  proc = run_train(workdir, f"--config.data_dir={mnist_dir}", *ARGS,
                   "--config.seed=5", check=False)
  assert "seed 0 -> 5" in one_line_error(proc)


def test_damaged_config_and_results_are_written_again(
    finished, mnist_dir, tmp_path):
  """Binary bytes in config.json and results.json (once a traceback): the
  checkpoint's config decides, the damaged config.json is kept aside, and
  results.json is written again with the same figures."""
  workdir = copy_of(finished, tmp_path)
  before = results(workdir)
  damaged = (workdir / "config.json").read_bytes() + b"\xff\xfe\x00"
  (workdir / "config.json").write_bytes(damaged)
  with open(workdir / "results.json", "ab") as f:
    f.write(b"\x80\x81")
  proc = run_train(workdir, f"--config.data_dir={mnist_dir}", *ARGS)
  assert "config.json is not UTF-8 text" in proc.stderr
  assert "results.json is not UTF-8 text" in proc.stderr
  assert (workdir / "set_aside" / "config.json.damaged").read_bytes() == (
      damaged)
  json.loads((workdir / "config.json").read_text())
  after = results(workdir)
  for key in ("params_sha256", "test_accuracy", "final_train_loss",
              "train_seconds", "images_per_sec", "steps_run",
              "resumed_from"):
    assert after[key] == before[key], key


def test_ctrl_c_during_the_report_exits_130_with_the_results(
    finished, mnist_dir, tmp_path):
  """One Ctrl-C once the last checkpoint is on disk (the report is being
  written): the report and results.json are finished, then exit 130 (it
  once exited 0)."""
  workdir = tmp_path / "run"
  proc = start_train(workdir, f"--config.data_dir={mnist_dir}", *ARGS,
                     CACHE_FLAG)
  wait_for(lambda: checkpoint_steps(workdir)[-1:] == [30], proc, poll=0.01)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == INTERRUPTED, stderr[-3000:]
  assert "Traceback" not in stderr
  assert ("interrupted after the run finished at step 30: results.json is "
          "written") in stderr
  assert results(workdir)["params_sha256"] == (
      results(finished)["params_sha256"])


def test_workdir_deleted_during_a_save_is_one_line(mnist_dir, tmp_path):
  """The workdir removed while the final checkpoint is being written (once
  a 90-line FileNotFoundError from orbax's background save; earlier saves
  are caught by the lock's check at the next one)."""
  workdir = tmp_path / "run"
  proc = start_train(workdir, f"--config.data_dir={mnist_dir}", *ARGS,
                     CACHE_FLAG)
  checkpoints = workdir / "checkpoints"
  wait_for(lambda: checkpoints.exists() and any(
      p.name.startswith("30.") for p in checkpoints.iterdir()), proc,
           poll=0.005)
  shutil.rmtree(workdir, ignore_errors=True)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and str(workdir) in last, last
