"""The train state and the pure train step that `jax.jit` compiles.

Augmentation and dropout keys are folded from (seed, step), so a step's
result depends only on the state and the batch: a resumed run repeats an
uninterrupted one exactly.
"""

from __future__ import annotations

import hashlib
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnist_resnet.data import mnist
from mnist_resnet.model import preprocess
from mnist_resnet.model import resnet

# Batch -> (state, metrics): the signature of the compiled train step.
TrainStep = Callable[["TrainState", Mapping[str, jax.Array]],
                     tuple["TrainState", dict[str, jax.Array]]]


class TrainState(flax.struct.PyTreeNode):
  """Everything a checkpoint holds.

  `ema` is {} when EMA is off, else {"params": ..., "batch_stats": ...}: the
  moving average of both, so evaluation never pairs averaged weights with
  BatchNorm statistics of the live ones.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any


def new_state(variables: Mapping[str, Any], tx: optax.GradientTransformation,
              groups: Sequence[str], keep_ema: bool) -> TrainState:
  """Step 0 from model variables; optimizer state for `groups` only."""
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables["batch_stats"],
      opt_state=tx.init({k: params[k] for k in groups}),
      ema=({"params": params, "batch_stats": variables["batch_stats"]}
           if keep_ema else {}))


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """The EMA decay after `step` updates: min(decay, (1 + step) / (10 + step)).

  A constant decay d from the initial weights keeps d**step of them (half of
  a 700-step run at 0.999): evaluated, such an average is mostly the random
  initialisation. The warm-up forgets the start at once and reaches `decay`
  after about 10 / (1 - decay) steps.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def eval_variables(state: TrainState) -> tuple[Any, Any]:
  """(params, batch_stats) evaluation uses: the EMA pair when it is kept."""
  if state.ema:
    return state.ema["params"], state.ema["batch_stats"]
  return state.params, state.batch_stats


def make_train_step(model: resnet.ResNet, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *,
                    model_input: preprocess.ModelInput, groups: Sequence[str],
                    label_smoothing: float, ema_decay: float,
                    seed: int) -> TrainStep:
  """The pure train step: (state, batch) -> (state, metrics).

  Only `groups` get gradients; without 'backbone' among them the backbone is
  frozen entirely, BatchNorm statistics included.
  """
  groups = tuple(groups)
  frozen_backbone = "backbone" not in groups
  base_key = jax.random.fold_in(jax.random.key(seed), 1)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    aug_key, dropout_key = jax.random.split(
        jax.random.fold_in(base_key, state.step))
    x = model_input.for_training(batch["image"], aug_key)
    labels = batch["label"]
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels, mnist.NUM_CLASSES), label_smoothing)

    def loss_fn(trainable):
      variables = {"params": {**state.params, **trainable},
                   "batch_stats": state.batch_stats}
      if frozen_backbone:
        logits = model.apply(variables, x, train=True, frozen_backbone=True,
                             rngs={"dropout": dropout_key})
        batch_stats = state.batch_stats
      else:
        logits, updates = model.apply(
            variables, x, train=True, rngs={"dropout": dropout_key},
            mutable=["batch_stats"])
        batch_stats = updates["batch_stats"]
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      return loss, (logits, batch_stats)

    trainable = {k: state.params[k] for k in groups}
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = {**state.params, **optax.apply_updates(trainable, updates)}
    ema = state.ema
    if ema_decay > 0:
      ema = optax.incremental_update(
          {"params": params, "batch_stats": batch_stats}, ema,
          1.0 - ema_decay_at(ema_decay, state.step + 1))
    new = TrainState(step=state.step + 1, params=params,
                     batch_stats=batch_stats, opt_state=opt_state, ema=ema)
    metrics = {
        "train_loss": loss,
        "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "learning_rate": schedule(state.step),
        "grad_norm": optax.global_norm(grads),
    }
    return new, metrics

  return train_step


def params_sha256(params: Any) -> str:
  """sha256 over the float32 bytes of every parameter, in sorted path order."""
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
  digest = hashlib.sha256()
  for _, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    digest.update(np.ascontiguousarray(leaf, dtype=np.float32).tobytes())
  return digest.hexdigest()
