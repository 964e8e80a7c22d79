"""Time to target accuracy and where a run's time went."""

from __future__ import annotations

import json
import pathlib
import shutil
import time

import pytest
from test_train import results
from test_train import run_train

from mnist_resnet.training import goodput

# Validation accuracy 0.15, 0.214, 0.576, 0.927, 0.943 at steps 20..100
# (seed 0, one device): 0.8 is first reached at step 80, far from either side.
TARGET_ARGS = ("--config.download=false", "--config.num_train_steps=100",
               "--config.eval_every_steps=20",
               "--config.checkpoint_every_steps=1000",
               "--config.validation_examples=1000",
               "--config.target_accuracy=0.8", "--config.stop_at_target=true")


def test_clock_leaves_out_compilation_and_goes_on_from_a_checkpoint(
    monkeypatch):
  now = [100.0]
  monkeypatch.setattr(time, "perf_counter", lambda: now[0])
  clock = goodput.TargetClock(0.9, "validation", {"seconds": 5.0})
  clock.start()
  now[0] += 10
  clock.leave_out(3.0)  # An evaluation step compiled.
  assert clock.seconds() == 12.0
  assert not clock.evaluated(20, {"validation_accuracy": 0.85,
                                  "test_accuracy": 0.95})
  now[0] += 1
  assert clock.evaluated(40, {"validation_accuracy": 0.9,
                              "test_accuracy": 0.5})
  now[0] += 1
  assert not clock.evaluated(60, {"validation_accuracy": 0.99})
  assert clock.results() == {
      "target_accuracy": 0.9, "target_split": "validation",
      "target_reached_step": 40, "seconds_to_target": 13.0}
  again = goodput.TargetClock(0.9, "validation", clock.meta())
  assert again.reached_step == 40 and again.seconds() == 14.0


def test_no_target_reports_nulls():
  clock = goodput.TargetClock(0.0, "test")
  assert not clock.evaluated(10, {"test_accuracy": 1.0})
  assert set(clock.results().values()) == {None}


def test_breakdown_adds_up_to_the_total(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(time, "perf_counter", lambda: now[0])
  phases = goodput.Goodput()
  now[0] = 2.0
  with phases.phase("compilation"):
    now[0] = 5.0
  phases.add("training", 4.0)
  now[0] = 12.0
  assert phases.breakdown() == {"start_up": 5.0, "compilation": 3.0,
                                "training": 4.0, "total": 12.0}


@pytest.fixture(scope="module")
def stopped(mnist_dir, tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("stopped")
  run_train(workdir, f"--config.data_dir={mnist_dir}", *TARGET_ARGS)
  return workdir


def test_stop_at_target_ends_the_run_at_that_evaluation(stopped):
  r = results(stopped)
  assert r["target_reached_step"] == r["step"] == r["best_step"] == 80
  assert r["target_split"] == "validation" and r["target_accuracy"] == 0.8
  assert r["validation_accuracy"] >= 0.8 and 0 < r["test_accuracy"] <= 1
  assert r["steps_run"] == 80
  checkpoints = sorted(int(p.name) for p in (stopped / "checkpoints").iterdir()
                       if p.name.isdigit())
  assert checkpoints[-1] == 80
  time_spent = r["time"]
  assert set(time_spent) == {
      "start_up", "compilation", "training", "evaluation",
      "evaluation_compilation", "checkpoint_blocking", "report", "total"}
  assert all(v >= 0 for v in time_spent.values())
  assert sum(time_spent.values()) - time_spent["total"] == pytest.approx(
      time_spent["total"], abs=0.01)
  # The clock: training, evaluations and saves; no compilation.
  assert 0 < r["seconds_to_target"] <= (
      time_spent["training"] + time_spent["evaluation"]
      + time_spent["checkpoint_blocking"] + 1.0)
  assert r["versions"]["jax"] and r["versions"]["device_kind"] == "cpu"


def test_a_resumed_run_keeps_its_clock(stopped, mnist_dir, tmp_path):
  """Killed after the checkpoint of step 40: the rerun starts its clock at
  the time saved with it, and stops at the same step with the same
  parameters."""
  workdir = tmp_path / "run"
  shutil.copytree(stopped, workdir)
  for step in (60, 80):
    shutil.rmtree(workdir / "checkpoints" / str(step))
  (workdir / "results.json").unlink()
  saved = json.loads((workdir / "checkpoints" / "40" / "meta" /
                      "metadata").read_text())[goodput.CLOCK]["seconds"]
  assert saved > 0
  run_train(workdir, f"--config.data_dir={mnist_dir}", *TARGET_ARGS)
  first, again = results(stopped), results(workdir)
  assert again["resumed_from"] == 40 and again["step"] == 80
  assert again["target_reached_step"] == 80
  assert again["seconds_to_target"] > saved
  assert again["params_sha256"] == first["params_sha256"]


def test_a_rerun_of_a_run_stopped_at_its_target_trains_nothing(
    stopped, mnist_dir, tmp_path):
  """Killed during the report of a run that stopped at its target: the
  rerun ends at the same step rather than training on to the total."""
  workdir = tmp_path / "run"
  shutil.copytree(stopped, workdir)
  (workdir / "results.json").unlink()
  run_train(workdir, f"--config.data_dir={mnist_dir}", *TARGET_ARGS)
  r = results(workdir)
  assert r["step"] == 80 and r["steps_run"] == 80
  assert r["seconds_to_target"] == results(stopped)["seconds_to_target"]
