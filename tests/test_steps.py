"""The train step: EMA of weights and statistics, state layout."""

from __future__ import annotations

import jax
import numpy as np

from configs import smoke
from mnist_resnet import parallel
from mnist_resnet import steps
from mnist_resnet import train


def test_ema_warms_up_then_reaches_its_decay():
  d = np.asarray([steps.ema_decay_at(0.999, s) for s in (1, 10, 100, 20000)])
  np.testing.assert_allclose(d, [2 / 11, 11 / 20, 101 / 110, 0.999],
                             rtol=1e-6)


def test_ema_is_updated_from_both_params_and_batch_stats():
  config = smoke.get_config()
  config.ema_decay = 0.9
  config.batch_size = 8
  program = train.build_program(config, 1000)
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
