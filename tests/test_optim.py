"""Schedule and optimizer: what decays, and what each group's step is."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_resnet import models
from mnist_resnet import optim


def flat(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def tiny_params():
  model = models.create_model("resnet_tiny")
  return model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                    train=False)["params"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_reaches_kernels_only(optimizer, tiny_params):
  """With zero gradients, one step moves exactly the conv and dense kernels:
  BatchNorm scales and offsets and every bias are not decayed."""
  schedule = optim.create_schedule(0.4, 128, 0, 1000)
  tx = optim.create_optimizer(
      schedule, optimizer=optimizer, groups=optim.trainable_groups("all"),
      weight_decay=0.1, momentum=0.9, nesterov=True,
      backbone_lr_multiplier=0.5)
  params = jax.device_get(tiny_params)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = {k: bool(np.any(np.asarray(u) != 0))
           for k, u in flat(updates).items()}
  kernels = {k for k in moved if k.endswith("['kernel']")}
  assert len(kernels) == 18  # 17 convolutions + the dense layer.
  for key, did_move in moved.items():
    assert did_move == (key in kernels), key
  # The backbone's decay follows its learning-rate multiplier.
  upd, prm = flat(updates), flat(params)
  ratio = lambda k: float(np.asarray(upd[k]).ravel()[0] /
                          np.asarray(prm[k]).ravel()[0])
  head = ratio("['head']['logits']['kernel']")
  body = ratio("['backbone']['conv1_conv']['kernel']")
  np.testing.assert_allclose(body, 0.5 * head, rtol=1e-5)
  # The peak is per 256 examples: 0.4 * 128 / 256, times the decay (and,
  # for Nesterov's first step, times 1 + momentum).
  nesterov = 1.9 if optimizer == "sgd" else 1.0
  np.testing.assert_allclose(head, -0.2 * 0.1 * nesterov, rtol=1e-5)


def test_schedule_warms_up_then_decays_to_zero():
  schedule = optim.create_schedule(0.1, 512, 10, 100)
  np.testing.assert_allclose(
      [float(schedule(s)) for s in (0, 5, 10, 100)], [0.0, 0.1, 0.2, 0.0],
      atol=1e-7)
  # No room for a warmup: cosine from the peak.
  np.testing.assert_allclose(float(optim.create_schedule(0.1, 256, 0, 50)(0)),
                             0.1)


def test_head_only_trains_the_head():
  assert optim.trainable_groups("head") == ("head",)
  assert optim.trainable_groups("all") == ("backbone", "head")
