"""The run directory (Workdir): results, the saved config and the resume
check for every config key, moves in a bucket."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from configs import smoke
from conftest import REPO_ROOT
from mnist_resnet.core import files
from mnist_resnet.workdir import rundir
from mnist_resnet.workdir.rundir import RunDirError
from mnist_resnet.workdir.workdir import ADDED_KEYS
from mnist_resnet.workdir.workdir import RESUMABLE_KEYS
from mnist_resnet.workdir.workdir import Workdir


def test_results_are_strict_json(tmp_path):
  Workdir(tmp_path).write_results({"loss": math.nan, "nested": {"x": math.inf},
                                  "ok": 1.5, "steps": (1, 2)})
  text = (tmp_path / "results.json").read_text()
  assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
      "loss": None, "nested": {"x": None}, "ok": 1.5, "steps": [1, 2]}
  assert not [p for p in tmp_path.iterdir() if p.name != "results.json"]


def test_gs_workdir_stays_a_bucket_location():
  path = Workdir("gs://bucket/run").checkpoint_dir
  assert str(path) == "gs://bucket/run/checkpoints"
  assert files.is_remote(path) and not files.is_remote("runs/a")
  assert str(rundir.workdir_path("runs/a")).startswith("/")


@pytest.fixture
def saved(tmp_path):
  config = smoke.get_config()
  Workdir(tmp_path).save_config(config.to_dict())
  return Workdir(tmp_path), config


def _another_value(value):
  """A value of the same type that differs from `value`."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value * 2 + 1
  if isinstance(value, str):
    return value + "x"
  if isinstance(value, tuple):
    return value + (7,)
  raise AssertionError(f"no other value for {value!r}")


def test_resume_with_the_same_config_is_accepted(saved):
  workdir, config = saved
  workdir.check_resume_config(config.to_dict())


KEYS = sorted(smoke.get_config().keys())


@pytest.mark.parametrize("key", KEYS)
def test_every_key_is_resumable_or_refused(saved, key):
  """Derived from the config's own keys: a new key is classified by
  RESUMABLE_KEYS (where or how a run runs) or refused on resume."""
  workdir, config = saved
  old = config[key]
  config[key] = _another_value(old)
  if key in RESUMABLE_KEYS:
    workdir.check_resume_config(config.to_dict())
    return
  with pytest.raises(RunDirError) as e:
    workdir.check_resume_config(config.to_dict())
  message = str(e.value)
  assert "\n" not in message
  assert f"{key} {json.loads(json.dumps(old))!r} -> " in message, message
  assert "config.json holds another run" in message


def test_saved_config_that_is_not_json_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(RunDirError, match=r"config.json is not valid JSON"):
    Workdir(tmp_path).check_resume_config({"seed": 0})


def test_move_tree_in_a_bucket(gcs_bucket, gcs_server):
  source = rundir.workdir_path(gcs_bucket) / "checkpoints" / "7"
  for name in ("state/a", "state/d/b", "meta/c"):
    (source / name).parent.mkdir(parents=True, exist_ok=True)
    (source / name).write_text(name)
  rundir.move_tree(source, Workdir(gcs_bucket).set_aside_dir / "7.damaged")
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


# The keys of the first configs/default.py: a workdir may hold a config.json
# with exactly these. Every later key must be in ADDED_KEYS.
FIRST_KEYS = frozenset("""
aug_max_rotation aug_max_scale aug_max_shift backbone_lr_multiplier
batch_size bn_momentum checkpoint_every_steps data_dir download dropout_rate
dtype ema_decay eval_batch_size eval_every_steps grad_clip_norm hidden_units
image_size init input_convention label_smoothing learning_rate
log_every_steps max_checkpoints_to_keep model momentum nesterov num_epochs
num_train_steps optimizer pretrained_weights profile_steps seed trainable
warmup_steps weight_decay zero_init_residual""".split())


def test_every_key_added_since_the_first_config_has_its_old_value():
  from configs import default  # pylint: disable=g-import-not-at-top
  keys = set(default.get_config().keys())
  unclassified = keys - FIRST_KEYS - set(ADDED_KEYS)
  assert not unclassified, (
      f"{sorted(unclassified)}: add each to ADDED_KEYS with the value "
      "that reproduces how runs behaved before the key existed")
  assert set(ADDED_KEYS) <= keys


def test_a_config_json_older_than_a_key_resumes_and_loads(tmp_path):
  """A config.json written before the newer keys existed: the same run
  resumes (those keys read as their old values), and the tools read it."""
  from mnist_resnet.training import trained  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  old = {k: v for k, v in config.to_dict().items() if k in FIRST_KEYS}
  (tmp_path / "config.json").write_text(json.dumps(old))
  for key, value in ADDED_KEYS.items():
    config[key] = value
  Workdir(tmp_path).check_resume_config(config.to_dict())
  loaded = trained.read_config(tmp_path)
  assert loaded.validation_examples == 0 and loaded.input_pipeline == "tfdata"
  assert loaded.hidden_units == tuple(config.hidden_units)
  config.validation_examples = 100  # Not the old behaviour: refused.
  with pytest.raises(RunDirError, match="validation_examples 0 -> 100"):
    Workdir(tmp_path).check_resume_config(config.to_dict())


def _checkpointed_run(tmp_path, config, steps=(10, 20)) -> Workdir:
  """A workdir whose checkpoints carry `config` in their meta, as the loop
  saves them, and no config.json."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  run = Workdir(tmp_path)
  ckpt = run.open_checkpointer(max_to_keep=5, keep_best=False)
  for step in steps:
    ckpt.save(step, {"w": jnp.full((4,), step, jnp.float32)},
              meta={"config": config.to_dict(), "step": step})
  ckpt.wait_until_finished()
  return run


def test_without_config_json_the_newest_checkpoints_config_decides(tmp_path):
  """config.json deleted: the config saved with the checkpoints still
  refuses another trajectory (it once resumed with the new value)."""
  config = smoke.get_config()
  run = _checkpointed_run(tmp_path, config)
  changed = smoke.get_config()
  changed.learning_rate = 0.05
  with pytest.raises(RunDirError, match=r"checkpoints/20 holds another run: "
                                        r"learning_rate 0.4 -> 0.05"):
    run.check_resume_config(changed.to_dict())
  run.check_resume_config(config.to_dict())
  assert run.config_from_checkpoint()
  run.restore_config_file(run.saved_config())
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0
  assert run.saved_config() is not None and not run.config_from_checkpoint()
  run.close()


def test_a_damaged_config_json_is_kept_aside_and_written_again(tmp_path):
  config = smoke.get_config()
  run = _checkpointed_run(tmp_path, config)
  damaged = rundir.to_json(config.to_dict()).encode() + b"\xff\x00\x9c"
  (tmp_path / "config.json").write_bytes(damaged)
  assert run.saved_config()["model"] == config.model
  assert run.config_from_checkpoint()
  run.restore_config_file(run.saved_config())
  assert (tmp_path / "set_aside" / "config.json.damaged").read_bytes() == (
      damaged)
  assert json.loads((tmp_path / "config.json").read_text())["model"] == (
      config.model)
  run.close()


def test_a_config_json_that_is_a_directory_is_named_as_one(tmp_path):
  run = _checkpointed_run(tmp_path, smoke.get_config())
  (tmp_path / "config.json").mkdir()
  with pytest.raises(RunDirError, match=r"config.json is a directory, not a "
                                        r"file; move it away"):
    run.check_resume_config(smoke.get_config().to_dict())
  run.close()


def test_a_damaged_results_json_is_written_again(tmp_path):
  (tmp_path / "results.json").write_bytes(b'{"step": 30}\xff')
  assert Workdir(tmp_path).results() is None


def test_finished_results_are_only_those_of_the_same_config(tmp_path):
  """A retry returns results.json untouched only when it was written by a
  run of this config; another run's results are written again."""
  from mnist_resnet.training import train  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  run = _checkpointed_run(tmp_path, config, steps=(30,))
  run.write_results({"step": 30, "config": config.to_dict()})
  assert train.finished_results(config, run)["step"] == 30
  other = smoke.get_config()
  other.seed = 5
  assert train.finished_results(other, run) is None
  run.close()


def test_bucket_requests_have_a_time_limit():
  """A bucket that stops answering must not hold a write for ever: gcsfs's
  default is no limit per request."""
  import fsspec  # pylint: disable=g-import-not-at-top
  fs = fsspec.filesystem("gs", token="anon", skip_instance_cache=True)
  assert fs.requests_timeout == rundir.STORAGE_REQUEST_TIMEOUT_S
