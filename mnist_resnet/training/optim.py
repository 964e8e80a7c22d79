"""Learning-rate schedule and optimizer over the trainable parameter groups.

Parameters are split at the top level into 'backbone' and 'head' (see
model/resnet.py); the optimizer sees only the groups that train, so a frozen
backbone has no optimizer state at all.
"""

from __future__ import annotations

from typing import Any
from typing import Sequence

import jax
import optax

# The learning rate in configs is per 256 examples, scaled linearly.
REFERENCE_BATCH = 256


def trainable_groups(trainable: str) -> tuple[str, ...]:
  """Top-level parameter groups that receive gradients ('all' or 'head')."""
  return ("head",) if trainable == "head" else ("backbone", "head")


def create_schedule(learning_rate: float, batch_size: int, warmup_steps: int,
                    total_steps: int) -> optax.Schedule:
  """Linear warmup to the batch-scaled peak, then cosine decay to zero."""
  peak = learning_rate * batch_size / REFERENCE_BATCH
  warmup = min(int(warmup_steps), total_steps - 1)
  if warmup <= 0:
    return optax.cosine_decay_schedule(peak, decay_steps=total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=total_steps, end_value=0.0)


def decay_mask(params: Any) -> Any:
  """Weight decay on kernels only: BatchNorm scales/biases and biases are
  1-D, kernels have 2 (dense) or 4 (conv) dimensions."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(schedule: optax.Schedule, *, optimizer: str,
                     groups: Sequence[str], weight_decay: float,
                     momentum: float = 0.9, nesterov: bool = False,
                     backbone_lr_multiplier: float = 1.0,
                     grad_clip_norm: float = 0.0
                     ) -> optax.GradientTransformation:
  """The optimizer over {group name: params} for the trainable `groups`."""
  def base(lr):
    if optimizer == "adamw":
      return optax.adamw(lr, weight_decay=weight_decay, mask=decay_mask)
    parts = []
    if weight_decay > 0:
      # L2: added to the gradient, so it goes through momentum (as in
      # torch.optim.SGD), not decoupled as in adamw.
      parts.append(optax.add_decayed_weights(weight_decay, decay_mask))
    parts.append(optax.sgd(lr, momentum=momentum or None, nesterov=nesterov))
    return optax.chain(*parts)

  if "backbone" in groups and backbone_lr_multiplier != 1.0:
    tx = optax.multi_transform(
        {"backbone": base(lambda s: schedule(s) * backbone_lr_multiplier),
         "head": base(schedule)},
        lambda tree: {k: jax.tree.map(lambda _: k, v) for k, v in tree.items()})
  else:
    tx = base(schedule)
  if grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx
