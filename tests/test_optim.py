"""Schedule and optimizer: what decays, and what each group's step is."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mnist_resnet.model import resnet
from mnist_resnet.training import optim


def flat(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def tiny_params():
  """The tiny model's parameters, its output layer random as after
  training (it starts at zero, which no decay would move)."""
  model = resnet.create_model("resnet_tiny")
  # Jitted: op-by-op initialisation of the ResNet is several times slower.
  params = jax.device_get(jax.jit(
      lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)),
                             train=False)["params"])(jax.random.key(0)))
  kernel = params["head"]["logits"]["kernel"]
  params["head"]["logits"]["kernel"] = np.random.default_rng(0).normal(
      size=kernel.shape).astype(np.float32)
  return params


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
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
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


def sgd(*, nesterov=False, momentum=0.9, grad_clip_norm=0.0, lr=0.5,
        groups=("head",), backbone_lr_multiplier=1.0):
  """The project's SGD at a constant learning rate, no weight decay."""
  return optim.create_optimizer(
      optax.constant_schedule(lr), optimizer="sgd", groups=groups,
      weight_decay=0.0, momentum=momentum, nesterov=nesterov,
      backbone_lr_multiplier=backbone_lr_multiplier,
      grad_clip_norm=grad_clip_norm)


def run_steps(tx, params, grads_per_step):
  state = tx.init(params)
  out = []
  for grads in grads_per_step:
    updates, state = tx.update(grads, state, params)
    out.append(jax.device_get(updates))
  return out


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_and_nesterov_follow_the_formulas(nesterov):
  """optax's SGD with momentum m: trace_t = g_t + m * trace_{t-1};
  update_t = -lr * trace_t, or with Nesterov -lr * (g_t + m * trace_t).
  Both groups, the backbone at its learning-rate multiplier."""
  lr, m, mult = 0.5, 0.9, 0.25
  g1 = np.array([1.0, -2.0, 0.5], np.float32)
  g2 = np.array([-3.0, 1.0, 4.0], np.float32)
  params = {"backbone": {"w": np.zeros(3, np.float32)},
            "head": {"w": np.zeros(3, np.float32)}}
  grads = [{"backbone": {"w": g}, "head": {"w": g}} for g in (g1, g2)]
  tx = sgd(nesterov=nesterov, momentum=m, lr=lr,
           groups=optim.trainable_groups("all"), backbone_lr_multiplier=mult)
  u1, u2 = run_steps(tx, params, grads)
  trace1 = g1
  trace2 = g2 + m * trace1
  if nesterov:
    want = [-lr * (g1 + m * trace1), -lr * (g2 + m * trace2)]
  else:
    want = [-lr * trace1, -lr * trace2]
  for got, expected in zip((u1, u2), want):
    np.testing.assert_allclose(got["head"]["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(got["backbone"]["w"], mult * expected,
                               rtol=1e-6)


def test_nesterov_changes_the_update():
  g = {"head": {"w": np.ones(2, np.float32)}}
  params = {"head": {"w": np.zeros(2, np.float32)}}
  (plain,) = run_steps(sgd(nesterov=False), params, [g])
  (nest,) = run_steps(sgd(nesterov=True), params, [g])
  # First step: -lr * g vs -lr * (1 + m) * g.
  np.testing.assert_allclose(nest["head"]["w"], 1.9 * plain["head"]["w"],
                             rtol=1e-6)


# A gradient of global norm 10 spread over both groups: 6 and 8.
CLIP_GRADS = {"backbone": {"w": np.array([6.0, 0.0], np.float32)},
              "head": {"w": np.array([0.0, 8.0], np.float32)}}


@pytest.mark.parametrize("clip, factor", [
    (1.0, 0.1), (2.5, 0.25),          # Scaled to the clip norm.
    (0.0, 1.0), (10.5, 1.0), (100.0, 1.0)])  # Off, or at/below the norm.
def test_grad_clip_scales_to_the_global_norm_before_the_optimizer(clip,
                                                                 factor):
  """Plain SGD (no momentum): the update is -lr * g * min(1, clip / |g|),
  the same factor for every leaf (a global norm, not one per leaf); clip 0
  disables clipping."""
  lr = 0.5
  params = jax.tree.map(np.zeros_like, CLIP_GRADS)
  (updates,) = run_steps(
      sgd(momentum=0.0, grad_clip_norm=clip, lr=lr,
          groups=optim.trainable_groups("all")), params, [CLIP_GRADS])
  for group in ("backbone", "head"):
    np.testing.assert_allclose(updates[group]["w"],
                               -lr * CLIP_GRADS[group]["w"] * factor,
                               rtol=1e-6)
  np.testing.assert_allclose(float(optax.global_norm(updates)),
                             lr * 10.0 * factor, rtol=1e-6)
