"""The train step: EMA of weights and statistics, label smoothing, state
layout."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from configs import smoke
from conftest import REPO_ROOT
from mnist_resnet.core import parallel
from mnist_resnet.training import program as program_lib
from mnist_resnet.training import steps


def test_ema_warms_up_then_reaches_its_decay():
  d = np.asarray([steps.ema_decay_at(0.999, s) for s in (1, 10, 100, 20000)])
  np.testing.assert_allclose(d, [2 / 11, 11 / 20, 101 / 110, 0.999],
                             rtol=1e-6)


def test_ema_is_updated_from_both_params_and_batch_stats():
  config = smoke.get_config()
  config.ema_decay = 0.9
  config.batch_size = 8
  program = program_lib.build_program(config, 1000)
  state = program.initial_state()
  before = jax.device_get(state)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
      {"image": rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
       "label": rng.integers(0, 10, 8).astype(np.int32)}, program.mesh)
  state, _ = program.train_step(state, batch)
  after = jax.device_get(state)
  w = float(steps.ema_decay_at(0.9, 1))
  for col in ("params", "batch_stats"):
    want = jax.tree.map(lambda old, new: w * old + (1 - w) * new,
                        getattr(before, col), getattr(after, col))
    for a, b in zip(jax.tree.leaves(after.ema[col]), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_params_sha256_depends_on_every_value():
  params = {"a": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32)}
  same = {"b": np.ones(3, np.float32), "a": np.zeros((2, 2), np.float32)}
  assert steps.params_sha256(params) == steps.params_sha256(same)
  params["a"][1, 1] = 1e-8
  assert steps.params_sha256(params) != steps.params_sha256(same)


def test_label_smoothing_reaches_the_loss():
  """With the logits kernel at zero, every image's logits are the bias: the
  step's train_loss is the cross-entropy of that bias against the smoothed
  one-hot targets, computed here independently of optax.smooth_labels."""
  bias = np.array([3.0, -1.0, 0.5, 2.0, -2.0, 0.0, 1.0, -0.5, 1.5, -1.5],
                  np.float32)
  rng = np.random.default_rng(0)
  # Mostly classes with a high bias: smoothing raises the loss by ~0.13
  # (labels whose mean cross-entropy equals the uniform one would hide it).
  labels = np.array([0, 3, 3, 6, 8, 0, 2, 5], np.int32)
  images = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)
  batch = {"image": images, "label": labels}
  host_state = None
  losses = {}
  for smoothing in (0.0, 0.1):
    config = smoke.get_config()
    config.batch_size = 8
    config.label_smoothing = smoothing
    config.dropout_rate = 0.0
    config.aug_max_shift = 0
    config.aug_max_rotation = 0.0
    config.aug_max_scale = 0.0
    program = program_lib.build_program(config, 1000)
    if host_state is None:
      # The same initial state serves both programs (only the loss differs);
      # initialising once saves a compilation.
      host_state = jax.device_get(program.initial_state())
      logits_layer = host_state.params["head"]["logits"]
      logits_layer["kernel"] = np.zeros_like(logits_layer["kernel"])
      logits_layer["bias"] = bias.copy()
    state = parallel.replicate(host_state, program.mesh)
    _, metrics = program.train_step(
        state, parallel.global_batch(batch, program.mesh))
    losses[smoothing] = float(metrics["train_loss"])

    one_hot = np.eye(10, dtype=np.float32)[labels]
    targets = one_hot * (1.0 - smoothing) + smoothing / 10.0
    want = optax.softmax_cross_entropy(
        np.broadcast_to(bias, (8, 10)), targets).mean()
    np.testing.assert_allclose(losses[smoothing], float(want), rtol=1e-5)
  assert losses[0.1] - losses[0.0] > 0.1, losses


# Runs argv[1:] as `python ARGS` would, printing XLA_FLAGS as the process
# ends: what XLA was given, as the entry point set it.
_SHOW_XLA_FLAGS = r"""
import atexit, os, runpy, sys
atexit.register(lambda: print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""),
                              flush=True))
args = sys.argv[1:]
sys.path[0] = os.getcwd()
if args[0] == "-m":
  sys.argv = args[1:]
  runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
  sys.argv = args
  runpy.run_path(args[0], run_name="__main__")
"""


@pytest.mark.parametrize("command, deterministic", [
    ("train.py", True), ("train.py", False), ("benchmark", True)])
def test_deterministic_config_sets_the_xla_flag(tmp_path, command,
                                                deterministic):
  """--config.deterministic=true puts XLA's deterministic-ops flag in
  XLA_FLAGS, keeping the flags already there, before the run gets far (a
  workdir under a file, a bad mode, end it at once)."""
  (tmp_path / "file").write_text("x")
  if command == "train.py":
    args = ["train.py", "--config=configs/smoke.py",
            f"--workdir={tmp_path / 'file' / 'run'}"]
  else:
    args = ["-m", "mnist_resnet.benchmark", "--config=configs/benchmark.py",
            "--config.mode=none"]
  proc = subprocess.run(
      [sys.executable, "-c", _SHOW_XLA_FLAGS, *args,
       f"--config.deterministic={str(deterministic).lower()}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert proc.returncode == 2, proc.stderr[-3000:]
  flags = proc.stdout.strip().splitlines()[-1].split("=", 1)[1].split()
  wanted = ["--xla_force_host_platform_device_count=1"]
  if deterministic:
    wanted += list(parallel.DETERMINISTIC_XLA_FLAGS)
  assert flags == wanted, proc.stdout
