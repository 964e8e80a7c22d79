"""The run directory's files: results, the saved config, moves."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from configs import smoke
from mnist_resnet import rundir
from mnist_resnet.rundir import RunDirError


def test_results_are_strict_json(tmp_path):
  rundir.write_results(tmp_path, {"loss": math.nan, "nested": {"x": math.inf},
                                  "ok": 1.5, "steps": (1, 2)})
  text = (tmp_path / "results.json").read_text()
  assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
      "loss": None, "nested": {"x": None}, "ok": 1.5, "steps": [1, 2]}
  assert not [p for p in tmp_path.iterdir() if p.name != "results.json"]


def test_gs_workdir_stays_a_bucket_location():
  path = rundir.checkpoint_dir("gs://bucket/run")
  assert str(path) == "gs://bucket/run/checkpoints"
  assert rundir.is_remote(path) and not rundir.is_remote("runs/a")
  assert str(rundir.workdir_path("runs/a")).startswith("/")


@pytest.fixture
def saved(tmp_path):
  config = smoke.get_config()
  rundir.save_config(tmp_path, config.to_dict())
  return tmp_path, config


def test_resume_with_the_same_config_is_accepted(saved):
  workdir, config = saved
  rundir.check_resume_config(workdir, config.to_dict())


def test_resume_may_change_where_and_how_it_runs(saved):
  workdir, config = saved
  config.data_dir = "/elsewhere"
  config.log_every_steps = 7
  config.checkpoint_every_steps = 3
  config.num_train_steps = 10_000
  config.num_processes = 4
  rundir.check_resume_config(workdir, config.to_dict())


@pytest.mark.parametrize("key, value", [
    ("seed", 1), ("learning_rate", 0.3), ("model", "resnet50"),
    ("batch_size", 64), ("optimizer", "adamw"), ("validation_examples", 5000),
    ("hidden_units", (32,))])
def test_resume_that_changes_the_trajectory_is_refused(saved, key, value):
  workdir, config = saved
  old = config[key]
  config[key] = value
  with pytest.raises(RunDirError) as e:
    rundir.check_resume_config(workdir, config.to_dict())
  message = str(e.value)
  assert "\n" not in message
  assert f"{key} {json.loads(json.dumps(old))!r} -> " in message, message
  assert "config.json holds another run" in message


def test_saved_config_that_is_not_json_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(RunDirError, match=r"config.json is not valid JSON"):
    rundir.check_resume_config(tmp_path, {"seed": 0})


def test_move_tree_in_a_bucket(gcs_bucket, gcs_server):
  source = rundir.workdir_path(gcs_bucket) / "checkpoints" / "7"
  for name in ("state/a", "state/d/b", "meta/c"):
    (source / name).parent.mkdir(parents=True, exist_ok=True)
    (source / name).write_text(name)
  rundir.move_tree(source, rundir.set_aside_dir(gcs_bucket) / "7.damaged")
  bucket = gcs_bucket.removeprefix("gs://")
  assert sorted(gcs_server.list_objects(bucket)) == [
      "set_aside/7.damaged/meta/c", "set_aside/7.damaged/state/a",
      "set_aside/7.damaged/state/d/b"]


def test_checkpoints_path_that_is_a_file_is_refused_at_start(tmp_path):
  """Found before the data is read, not at the first save after training."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("not a directory")
  proc = subprocess.run(
      [sys.executable, str(REPO_ROOT / "train.py"),
       f"--config={REPO_ROOT / 'configs' / 'smoke.py'}",
       f"--workdir={workdir}", "--config.data_dir=/nonexistent"],
      cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1] == (
      f"error: {workdir}/checkpoints is a file, not a directory; move it "
      "away"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
