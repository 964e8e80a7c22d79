"""The pieces of the training recipes, checked in isolation (fast, no MNIST)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default, scratch, smoke
from mnist_resnet import data, parallel, preprocess, train


def tiny_config(**overrides):
  c = smoke.get_config()
  c.eval_batch_size = 8
  for key, value in overrides.items():
    c[key] = value
  return c


def flat(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_zero_init_residual_scales_are_zero_only_where_chosen():
  for zero in (True, False):
    trainer = train.Trainer.create(tiny_config(zero_init_residual=zero), 1000)
    params = flat(jax.device_get(trainer.initial_state().params["backbone"]))
    last = {k: v for k, v in params.items() if "_3_bn']['scale" in k}
    others = {k: v for k, v in params.items()
              if k.endswith("_bn']['scale']") and k not in last}
    assert len(last) == 4 and len(others) == 13  # stem + 3 per block
    for value in last.values():
      np.testing.assert_array_equal(value, 0.0 if zero else 1.0)
    for value in others.values():
      np.testing.assert_array_equal(value, 1.0)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_reaches_kernels_only(optimizer):
  """With zero gradients, one step moves exactly the conv and dense kernels:
  BatchNorm scales and offsets and every bias are not decayed."""
  config = tiny_config(optimizer=optimizer, weight_decay=0.1, warmup_steps=0,
                       backbone_lr_multiplier=0.5)
  trainer = train.Trainer.create(config, 1000)
  params = jax.device_get(trainer.initial_state().params)
  opt_state = trainer.tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = trainer.tx.update(grads, opt_state, params)
  moved = {k: bool(np.any(np.asarray(u) != 0))
           for k, u in flat(updates).items()}
  kernels = {k for k in moved if k.endswith("['kernel']")}
  assert len(kernels) == 18  # 17 convolutions + the dense layer.
  for key, did_move in moved.items():
    assert did_move == (key in kernels), key
  # The backbone's decay follows its learning-rate multiplier.
  upd = flat(updates)
  prm = flat(params)
  ratio = lambda k: float(np.asarray(upd[k]).ravel()[0] /
                          np.asarray(prm[k]).ravel()[0])
  head = ratio("['head']['logits']['kernel']")
  body = ratio("['backbone']['conv1_conv']['kernel']")
  np.testing.assert_allclose(body, 0.5 * head, rtol=1e-5)


def test_augmentation_keeps_each_image_with_its_label_and_never_flips():
  """Augmented example i is a small transform of input i (so labels stay
  aligned), and is closer to its input than to the input's mirror images."""
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 2, size=(16, 5, 5)).astype(np.uint8) * 255
  images = np.zeros((16, 28, 28), np.uint8)  # Random 4x4-pixel blocks.
  images[:, 4:24, 4:24] = np.kron(blocks, np.ones((4, 4), np.uint8))
  x = images.astype(np.float32)

  def distance(a, b):  # L1 distance at the best alignment within 3 pixels.
    p = np.pad(b, 3)
    return min(float(np.abs(a - p[3 + dy:31 + dy, 3 + dx:31 + dx]).sum())
               for dy in range(-3, 4) for dx in range(-3, 4))

  for kwargs in ({"max_shift": 2},
                 {"max_shift": 2, "max_rotation_deg": 10, "max_scale": 0.1}):
    out = np.asarray(preprocess.augment(jnp.asarray(images),
                                        jax.random.key(1), **kwargs))
    for i in range(16):
      own = distance(out[i], x[i])
      assert own < min(distance(out[i], x[j]) for j in range(16) if j != i)
      assert own < distance(out[i], x[i, :, ::-1])
      assert own < distance(out[i], x[i, ::-1, :])


def test_ema_warms_up_then_reaches_its_decay():
  d = np.asarray([train.ema_decay_at(0.999, s) for s in (1, 10, 100, 20000)])
  np.testing.assert_allclose(d, [2 / 11, 11 / 20, 101 / 110, 0.999],
                             rtol=1e-6)


def test_ema_is_updated_from_both_params_and_batch_stats():
  config = tiny_config(ema_decay=0.9, batch_size=8)
  trainer = train.Trainer.create(config, 1000)
  state = trainer.initial_state()
  before = jax.device_get(state)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
      {"image": rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
       "label": rng.integers(0, 10, 8).astype(np.int32)}, trainer.mesh)
  state, _ = trainer.train_step(state, batch)
  after = jax.device_get(state)
  w = float(train.ema_decay_at(0.9, 1))
  for col in ("params", "batch_stats"):
    want = jax.tree.map(lambda old, new: w * old + (1 - w) * new,
                        getattr(before, col), getattr(after, col))
    for a, b in zip(jax.tree.leaves(after.ema[col]), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_evaluation_uses_the_ema_when_kept():
  """A state whose EMA head always answers 3 scores the share of 3s."""
  config = tiny_config(ema_decay=0.99)
  trainer = train.Trainer.create(config, 1000)
  state = jax.device_get(trainer.initial_state())
  ema_params = jax.tree.map(np.array, state.ema["params"])
  logits = ema_params["head"]["logits"]
  logits["kernel"][:] = 0.0
  logits["bias"][:] = np.eye(10, dtype=np.float32)[3] * 10
  state = state.replace(ema={"params": ema_params,
                             "batch_stats": state.ema["batch_stats"]})
  state = parallel.replicate(state, trainer.mesh)
  labels = np.array([3, 3, 3, 1, 2, 3, 7, 0, 3, 5, 3], np.int32)
  split = data.Split(np.zeros((11, 28, 28), np.uint8), labels)
  got = trainer.evaluate(state, split)
  assert got["eval_examples"] == 11
  assert got["test_accuracy"] == pytest.approx(6 / 11)


@pytest.mark.parametrize("module", [default, scratch, smoke])
def test_shipped_recipes_pass_validation(module):
  config = module.get_config()
  train.validate_config(config)
