"""Training and evaluation: one jitted, data-parallel step over every device.

In the order the work happens (as `train_and_evaluate` does it):
  1. validate the config and the data files (before anything is allocated);
  2. mesh over all devices of all processes, model, optimizer, schedule;
  3. abstract train state from `jax.eval_shape`; restore from the workdir's
     latest checkpoint, else initialise (pretrained backbone or scratch);
  4. the loop: per-process tf.data shard -> global array -> train step;
     metrics leave the device one step late, so the host never waits for the
     step it just dispatched; asynchronous checkpoints; periodic eval;
  5. results.json.

Data order, augmentation and dropout are pure functions of (seed, step), so a
run resumed from a checkpoint ends with the same parameters as one that never
stopped (same config, same device count).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mnist_resnet import checkpoint as checkpoint_lib
from mnist_resnet import data
from mnist_resnet import models
from mnist_resnet import parallel
from mnist_resnet import preemption
from mnist_resnet import preprocess
from mnist_resnet import pretrained
from mnist_resnet import reporting
from mnist_resnet.errors import ConfigError, Preempted, TrainingError
from mnist_resnet.errors import WeightsError

NUM_CLASSES = 10
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


# --------------------------------------------------------------------------
# Config checks: all of them run before data is read or anything compiles.


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key."""
  def fail(key, why):
    raise ConfigError(f"config.{key}={config[key]!r}: {why}")

  def choice(key, options):
    if config[key] not in options:
      fail(key, f"must be one of {', '.join(options)}")

  choice("init", ("imagenet", "scratch"))
  choice("input_convention", ("caffe", "torch"))
  choice("optimizer", ("sgd", "adamw"))
  choice("trainable", ("all", "head"))
  choice("dtype", tuple(DTYPES))
  if config.model not in models.MODELS:
    fail("model", f"unknown model; known: {', '.join(sorted(models.MODELS))}")
  if config.init == "imagenet" and not config.pretrained_weights and (
      config.model not in pretrained.IMAGENET_MODELS):
    fail("init", f"Keras has no ImageNet weights for {config.model}; use "
         "init=scratch or give --config.pretrained_weights=PATH")
  positive = ("batch_size", "eval_batch_size", "log_every_steps",
              "checkpoint_every_steps", "max_checkpoints_to_keep",
              "learning_rate")
  for key in positive:
    if not config[key] > 0:
      fail(key, "must be > 0")
  non_negative = ("warmup_steps", "weight_decay", "grad_clip_norm",
                  "backbone_lr_multiplier", "profile_steps", "aug_max_shift",
                  "aug_max_rotation")
  for key in non_negative:
    if config[key] < 0:
      fail(key, "must be >= 0")
  for key in ("label_smoothing", "dropout_rate", "bn_momentum", "ema_decay",
              "aug_max_scale"):
    if not 0 <= config[key] < 1:
      fail(key, "must be in [0, 1)")
  if config.num_train_steps != -1 and config.num_train_steps <= 0:
    fail("num_train_steps", "must be > 0, or -1 to use num_epochs")
  if config.num_train_steps == -1 and not config.num_epochs > 0:
    fail("num_epochs", "must be > 0 when num_train_steps is -1")
  if config.eval_every_steps < -1:
    fail("eval_every_steps", "must be > 0, 0 (only at the end) or -1 "
         "(every epoch)")
  if config.image_size < 28:
    fail("image_size", "must be >= 28 (the digits are 28x28)")
  if config.aug_max_shift >= 14:
    fail("aug_max_shift", "must be < 14 pixels")
  if any(int(u) <= 0 for u in config.hidden_units):
    fail("hidden_units", "every width must be > 0")
  n = jax.device_count()
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % n:
      fail(key, f"must be divisible by the {n} devices")


def total_train_steps(config: ml_collections.ConfigDict,
                      num_examples: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  spe = data.steps_per_epoch(num_examples, config.batch_size)
  return max(1, int(round(config.num_epochs * spe)))


def eval_period(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """Steps between evaluations; 0 means only at the end."""
  if config.eval_every_steps == -1:
    return data.steps_per_epoch(num_examples, config.batch_size)
  return int(config.eval_every_steps)


# --------------------------------------------------------------------------
# Model, optimizer and state.


def create_model(config: ml_collections.ConfigDict) -> models.ResNet:
  return models.create_model(
      config.model, num_classes=NUM_CLASSES, dtype=DTYPES[config.dtype],
      hidden_units=tuple(int(u) for u in config.hidden_units),
      dropout_rate=config.dropout_rate, bn_momentum=config.bn_momentum,
      zero_init_residual=config.zero_init_residual)


def trainable_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Top-level parameter groups that receive gradients."""
  return ("head",) if config.trainable == "head" else ("backbone", "head")


def create_schedule(config: ml_collections.ConfigDict,
                    total_steps: int) -> optax.Schedule:
  """Linear warmup to the batch-scaled peak, then cosine decay to zero."""
  peak = config.learning_rate * config.batch_size / 256
  warmup = min(int(config.warmup_steps), total_steps - 1)
  if warmup <= 0:
    return optax.cosine_decay_schedule(peak, decay_steps=total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=total_steps, end_value=0.0)


def decay_mask(params: Any) -> Any:
  """Weight decay on kernels only: BatchNorm scales/biases and biases are
  1-D, kernels have 2 (dense) or 4 (conv) dimensions."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer over the trainable groups (a dict keyed by group name)."""
  def base(lr):
    if config.optimizer == "adamw":
      return optax.adamw(lr, weight_decay=config.weight_decay,
                         mask=decay_mask)
    parts = []
    if config.weight_decay > 0:
      parts.append(optax.add_decayed_weights(config.weight_decay, decay_mask))
    parts.append(optax.sgd(lr, momentum=config.momentum or None,
                           nesterov=config.nesterov))
    return optax.chain(*parts)

  keys = trainable_keys(config)
  mult = config.backbone_lr_multiplier
  if "backbone" in keys and mult != 1.0:
    tx = optax.multi_transform(
        {"backbone": base(lambda s: schedule(s) * mult),
         "head": base(schedule)},
        lambda tree: {k: jax.tree.map(lambda _: k, v) for k, v in tree.items()})
  else:
    tx = base(schedule)
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


def new_state(variables: Mapping[str, Any], tx: optax.GradientTransformation,
              config: ml_collections.ConfigDict) -> TrainState:
  params = variables["params"]
  trainable = {k: params[k] for k in trainable_keys(config)}
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables["batch_stats"], opt_state=tx.init(trainable),
      ema=({"params": params, "batch_stats": variables["batch_stats"]}
           if config.ema_decay > 0 else {}))


def resolve_pretrained(config: ml_collections.ConfigDict) -> str:
  """Local path of the pretrained weights: `pretrained_weights`, or Keras's
  ImageNet file from its cache (downloaded on first use)."""
  if config.pretrained_weights:
    return os.path.expanduser(config.pretrained_weights)
  return pretrained.imagenet_weights_path(config.model)


def load_pretrained_backbone(config: ml_collections.ConfigDict,
                             variables: Mapping[str, Any],
                             source: str) -> dict:
  """Host copy of `variables` with the backbone from `source`: a Keras
  weight file or a directory written by `python -m mnist_resnet.convert`."""
  host = jax.device_get(variables)
  if os.path.isdir(source):
    from mnist_resnet import convert  # pylint: disable=g-import-not-at-top
    loaded = convert.restore_variables(source)
    merged = {}
    for col in ("params", "batch_stats"):
      want = host[col]["backbone"]
      have = loaded.get(col, {}).get("backbone")
      if have is None or (jax.tree.structure(have) != jax.tree.structure(want)):
        raise WeightsError(f"{source}: converted weights do not fit "
                           f"{config.model} ({col}/backbone differs)")
      for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(have),
                              jax.tree.leaves(want)):
        if np.shape(a) != np.shape(b):
          raise WeightsError(
              f"{source}: {col}/backbone{jax.tree_util.keystr(path)} has "
              f"shape {np.shape(a)}, {config.model} expects {np.shape(b)}")
      merged[col] = {**host[col], "backbone": have}
    return merged
  return pretrained.load_keras_weights(source, host)


def params_sha256(params: Any) -> str:
  """sha256 over the float32 bytes of every parameter, in sorted path order."""
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
  digest = hashlib.sha256()
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    digest.update(np.ascontiguousarray(leaf, dtype=np.float32).tobytes())
  return digest.hexdigest()


# --------------------------------------------------------------------------
# Steps.


def _model_input(config, images, key=None):
  if key is not None:
    images = preprocess.augment(
        images, key, max_shift=int(config.aug_max_shift),
        max_rotation_deg=float(config.aug_max_rotation),
        max_scale=float(config.aug_max_scale))
  return preprocess.to_model_input(
      images, image_size=config.image_size,
      convention=config.input_convention, dtype=DTYPES[config.dtype])


def make_train_step(config: ml_collections.ConfigDict, model: models.ResNet,
                    tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable:
  """The pure train step: (state, batch) -> (state, metrics)."""
  keys = trainable_keys(config)
  frozen = config.trainable == "head"
  base_key = jax.random.fold_in(jax.random.key(config.seed), 1)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    step_key = jax.random.fold_in(base_key, state.step)
    aug_key, dropout_key = jax.random.split(step_key)
    x = _model_input(config, batch["image"], aug_key)
    if config.inject_nan_at_step > 0:  # Test-only: poison one batch.
      x = jnp.where(state.step + 1 == config.inject_nan_at_step, jnp.nan, x)
    labels = batch["label"]
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels, NUM_CLASSES), config.label_smoothing)

    def loss_fn(trainable):
      params = {**state.params, **trainable}
      variables = {"params": params, "batch_stats": state.batch_stats}
      if frozen:
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

    trainable = {k: state.params[k] for k in keys}
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    params = {**state.params, **trainable}
    ema = state.ema
    if config.ema_decay > 0:
      decay = ema_decay_at(config.ema_decay, state.step + 1)
      ema = optax.incremental_update(
          {"params": params, "batch_stats": batch_stats}, ema, 1.0 - decay)
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


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """The EMA decay after `step` updates: min(decay, (1 + step) / (10 + step)).

  A constant decay d starting from the initial weights keeps d**step of them
  (0.999**702 = 0.50 at the end of a 3-epoch run at batch 256): evaluated,
  such an average is mostly the random initialisation. The warm-up makes the
  average forget its start at once and reach `decay` after about 10 / (1 -
  decay) steps.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def eval_variables(state: TrainState) -> tuple[Any, Any]:
  """(params, batch_stats) evaluation uses: the EMA pair when it is kept."""
  if state.ema:
    return state.ema["params"], state.ema["batch_stats"]
  return state.params, state.batch_stats


def make_eval_step(config: ml_collections.ConfigDict,
                   model: models.ResNet) -> Callable:
  """(sums, params, batch_stats, batch) -> sums, over masked test batches."""

  def eval_step(sums, params, batch_stats, batch):
    x = _model_input(config, batch["image"])
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x,
                         train=False)
    labels = batch["label"]
    mask = batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
    onehot = jax.nn.one_hot(labels, NUM_CLASSES) * mask[:, None]
    return {
        "loss_sum": sums["loss_sum"] + jnp.sum(loss * mask),
        "correct": sums["correct"] + jnp.sum(correct),
        "count": sums["count"] + jnp.sum(mask),
        "class_correct": sums["class_correct"] + correct @ onehot,
        "class_count": sums["class_count"] + jnp.sum(onehot, 0),
    }

  return eval_step


def _zero_sums():
  return {"loss_sum": jnp.zeros(()), "correct": jnp.zeros(()),
          "count": jnp.zeros(()),
          "class_correct": jnp.zeros((NUM_CLASSES,)),
          "class_count": jnp.zeros((NUM_CLASSES,))}


# --------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Trainer:
  """Everything built from a config, before any array is allocated."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: models.ResNet
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  total_steps: int
  train_step: Callable
  eval_step: Callable
  init_variables: Callable

  @classmethod
  def create(cls, config: ml_collections.ConfigDict,
             num_train_examples: int) -> "Trainer":
    mesh = parallel.create_mesh()
    model = create_model(config)
    total = total_train_steps(config, num_train_examples)
    schedule = create_schedule(config, total)
    tx = create_optimizer(config, schedule)
    rep = parallel.replicated(mesh)
    batch = parallel.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(config, model, tx, schedule),
        in_shardings=(rep, batch), out_shardings=(rep, rep),
        donate_argnums=(0,))
    eval_step = jax.jit(
        make_eval_step(config, model), in_shardings=(rep, rep, rep, batch),
        out_shardings=rep, donate_argnums=(0,))
    size = config.image_size
    init_key = jax.random.fold_in(jax.random.key(config.seed), 0)

    def init_variables():
      dummy = jnp.zeros((1, size, size, 3), DTYPES[config.dtype])
      return model.init({"params": init_key, "dropout": init_key}, dummy,
                        train=False)

    return cls(config=config, mesh=mesh, model=model, schedule=schedule,
               tx=tx, total_steps=total, train_step=train_step,
               eval_step=eval_step,
               init_variables=jax.jit(init_variables, out_shardings=rep))

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state; nothing allocated."""
    rep = parallel.replicated(self.mesh)
    shapes = jax.eval_shape(
        lambda: new_state(self.init_variables(), self.tx, self.config))
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
        shapes)

  def initial_state(self, weights: str | None = None) -> TrainState:
    """Fresh state: backbone from `weights` (a Keras file or a converted
    checkpoint directory; see `resolve_pretrained`), else random."""
    variables = self.init_variables()
    if self.config.init == "imagenet":
      variables = parallel.replicate(load_pretrained_backbone(
          self.config, variables,
          weights or resolve_pretrained(self.config)), self.mesh)
    rep = parallel.replicated(self.mesh)
    return jax.jit(lambda v: new_state(v, self.tx, self.config),
                   out_shardings=rep)(variables)

  def evaluate(self, state: TrainState,
               test_split: data.Split) -> dict[str, Any]:
    """Loss, accuracy and per-class accuracy over every test example once."""
    sums = parallel.replicate(_zero_sums(), self.mesh)
    params, batch_stats = eval_variables(state)
    for local in data.test_dataset(
        test_split, global_batch_size=self.config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count()).as_numpy_iterator():
      sums = self.eval_step(sums, params, batch_stats,
                            parallel.global_batch(local, self.mesh))
    sums = jax.device_get(sums)
    count = int(sums["count"])
    per_class = sums["class_correct"] / np.maximum(sums["class_count"], 1)
    return {
        "test_accuracy": float(sums["correct"]) / count,
        "test_loss": float(sums["loss_sum"]) / count,
        "eval_examples": count,
        "per_class_accuracy": [round(float(a), 6) for a in per_class],
    }


class MetricsQueue:
  """Train metrics on their way off the device, without stalling the loop.

  Every step's metrics (a few scalars) are queued as device arrays. They are
  fetched together at each logged step, once the step after it has been
  dispatched (so the host waits for finished work while the device runs the
  next step), and before every evaluation or checkpoint. All fetched steps
  are checked for finiteness, so a divergence is reported at the step where
  it happened and a diverged state is never saved.
  """

  def __init__(self):
    self._queue: list[tuple[int, dict]] = []

  def put(self, step: int, metrics: dict) -> None:
    self._queue.append((step, metrics))

  def fetch(self, upto: int) -> list[tuple[int, dict]]:
    """Fetches (and checks) the metrics of every queued step <= `upto`."""
    ready = [item for item in self._queue if item[0] <= upto]
    self._queue = [item for item in self._queue if item[0] > upto]
    fetched = jax.device_get([m for _, m in ready])
    out = [(s, m) for (s, _), m in zip(ready, fetched)]
    for s, m in out:
      if not (np.isfinite(m["train_loss"]) and np.isfinite(m["grad_norm"])):
        raise TrainingError(
            f"non-finite train loss or gradient at step {s} "
            f"(loss={m['train_loss']}, grad_norm={m['grad_norm']}); stopped "
            "without saving it, the latest checkpoint is the last good one")
    return out


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *,
    on_step: Callable[[int, Mapping[str, jax.Array]], None] | None = None
) -> dict[str, Any]:
  """Trains per `config`, checkpoints into `workdir`, returns the results.

  `on_step(step, metrics)`, when given, is called right after each train step
  is dispatched, with that step's metrics still on the device: it observes
  the loop (benchmark.py times it this way) and must not wait for them, or
  the loop would stall.
  """
  validate_config(config)
  if config.init == "imagenet" and config.pretrained_weights and not (
      os.path.exists(os.path.expanduser(config.pretrained_weights))):
    raise WeightsError(f"config.pretrained_weights="
                       f"{config.pretrained_weights!r}: no such file or "
                       "directory")
  splits = data.load_mnist(config.data_dir, download=config.download)
  num_train = len(splits["train"].labels)
  if config.batch_size > num_train:
    raise ConfigError(f"config.batch_size={config.batch_size}: larger than "
                      f"the {num_train} training images")

  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=config.max_checkpoints_to_keep)
  # Resume order: the workdir's latest checkpoint, then pretrained, then
  # scratch (init=imagenet/scratch decides between the last two).
  latest = ckpt.latest_step()
  weights = None
  if latest is None and config.init == "imagenet":
    # Download (or find in Keras's cache) before anything compiles.
    try:
      weights = resolve_pretrained(config)
    except WeightsError:
      ckpt.close()
      raise

  trainer = Trainer.create(config, num_train)
  total = trainer.total_steps
  lead = jax.process_index() == 0
  meta = {"config": config.to_dict(), "devices": jax.device_count(),
          "processes": jax.process_count()}
  if latest is not None:
    logging.info("Resuming from %s/%d", ckpt.directory, latest)
    try:
      state = ckpt.restore(latest, trainer.abstract_state())
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(
          f"{ckpt.directory}/{latest} does not fit this config (model, "
          f"optimizer or trainable changed?): {str(e).splitlines()[0]}"
      ) from None
  else:
    state = trainer.initial_state(weights)
  start = int(jax.device_get(state.step))
  if start > total:
    raise ConfigError(f"{ckpt.directory}/{start} is past the run's "
                      f"{total} steps; use a new workdir")

  reporter = reporting.Reporter(workdir, writes=lead, total_steps=total,
                                start_step=start)
  spe = data.steps_per_epoch(num_train, config.batch_size)
  period = eval_period(config, num_train)
  logging.info("%s: %d steps (%d per epoch), global batch %d on %d devices "
               "(%d processes), starting at step %d", config.model, total,
               spe, config.batch_size, jax.device_count(),
               jax.process_count(), start)

  train_iter = data.train_dataset(
      splits["train"], global_batch_size=config.batch_size, seed=config.seed,
      start_step=start, num_steps=total - start,
      process_index=jax.process_index(),
      process_count=jax.process_count()).as_numpy_iterator()

  queue = MetricsQueue()
  last_train_loss = float("nan")
  eval_results: dict[str, Any] | None = None
  eval_seconds = 0.0
  # Trace `profile_steps` steps once the loop is warm (10 steps in, or
  # earlier in a short run), stopping at the end of the run at the latest.
  profile_at = (start + 1 + min(10, (total - start) // 2)
                if config.profile_steps else -1)
  profile_end = min(profile_at + config.profile_steps - 1, total)
  tracing = False
  t_loop = time.perf_counter()
  t_first = None
  # (time, step, eval seconds so far) at the last train log.
  window = (time.perf_counter(), start, 0.0)

  def log_train(fetched: list[tuple[int, dict]]) -> None:
    nonlocal window, last_train_loss
    if not fetched:
      return
    s, m = fetched[-1]
    last_train_loss = float(m["train_loss"])
    if s % config.log_every_steps and s != total:
      return
    now = time.perf_counter()
    seconds = now - window[0] - (eval_seconds - window[2])
    rate = (s - window[1]) * config.batch_size / max(seconds, 1e-9)
    window = (now, s, eval_seconds)
    reporter.scalars(s, {**m, "images_per_sec": rate})

  watcher = preemption.PreemptionWatcher(ckpt.reached_preemption)
  try:
    for step in range(start + 1, total + 1):
      if step == profile_at:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        tracing = True
      batch = parallel.global_batch(next(train_iter), trainer.mesh)
      state, metrics = trainer.train_step(state, batch)
      if t_first is None:
        t_first = time.perf_counter()   # compiled; step `start + 1` queued
      if tracing and step == profile_end:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        tracing = False
      # Fetch a logged step once the step after it is queued: the host
      # waits for finished work while the device runs the next step.
      if (step - 1) % config.log_every_steps == 0:
        log_train(queue.fetch(step - 1))
      queue.put(step, metrics)
      if on_step is not None:
        on_step(step, metrics)
      reporter.progress(step)

      do_eval = step == total or (period and step % period == 0)
      do_ckpt = step == total or step % config.checkpoint_every_steps == 0
      if do_eval or do_ckpt:
        log_train(queue.fetch(step))   # never save a diverged state
      if do_eval:
        t0 = time.perf_counter()
        eval_results = trainer.evaluate(state, splits["test"])
        eval_seconds += time.perf_counter() - t0
        reporter.scalars(step, {k: eval_results[k]
                                for k in ("test_accuracy", "test_loss")})
      if do_ckpt:
        ckpt.save(step, state, meta={**meta, "step": step},
                  metrics=({"test_accuracy": eval_results["test_accuracy"]}
                           if do_eval else None))
      if step < total and watcher.should_stop(step):
        if not do_ckpt:
          log_train(queue.fetch(step))
          ckpt.save(step, state, meta={**meta, "step": step})
        ckpt.wait_until_finished()
        logging.warning("Preemption notice: saved %s/%d", ckpt.directory,
                        step)
        raise Preempted(step)
    jax.block_until_ready(state)
    t_end = time.perf_counter()
    if eval_results is None or start == total:
      eval_results = trainer.evaluate(state, splits["test"])
    ckpt.wait_until_finished()
    best_step = ckpt.best_step()
  finally:
    if tracing:
      jax.profiler.stop_trace()
    watcher.close()
    reporter.close()
    ckpt.close()

  steps_run = total - start
  train_seconds = max(t_end - t_loop - eval_seconds, 0.0)
  timed = (t_end - t_first - eval_seconds) if t_first is not None else 0.0
  results = {
      "step": total,
      **eval_results,
      "final_train_loss": last_train_loss,
      "params_sha256": params_sha256(state.params),
      "train_seconds": round(train_seconds, 3),
      "images_per_sec": (round(steps_run * config.batch_size / timed, 2)
                         if timed > 0 else None),
      "steps_run": steps_run,
      "resumed_from": start if latest is not None else None,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "best_step": best_step,
      "config": config.to_dict(),
  }
  if lead:
    path = os.path.join(workdir, "results.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(results, f, indent=2, default=str)
    os.replace(tmp, path)
  logging.info("step %d: test_accuracy=%.4f test_loss=%.4f (%d examples)",
               total, results["test_accuracy"], results["test_loss"],
               results["eval_examples"])
  return results
