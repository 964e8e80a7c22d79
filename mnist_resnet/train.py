"""Training and evaluation: the orchestration, in the order the work happens.

  1. validate the config, load and check the data (nothing allocated yet);
  2. build the program: mesh, model, optimizer, jitted train step;
  3. restore the workdir's latest checkpoint, else initialise (pretrained
     backbone or scratch);
  4. the loop: per-process tf.data shard -> global array -> train step, with
     periodic evaluation, asynchronous checkpoints and preemption;
  5. results.json.

Data order, augmentation and dropout are pure functions of (seed, step), so a
run resumed from a checkpoint ends with the same parameters as one that never
stopped (same config, same device count).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mnist_resnet import checkpoint as checkpoint_lib
from mnist_resnet import data
from mnist_resnet import evaluator as evaluator_lib
from mnist_resnet import mnist
from mnist_resnet import models
from mnist_resnet import optim
from mnist_resnet import order
from mnist_resnet import parallel
from mnist_resnet import preemption
from mnist_resnet import preprocess
from mnist_resnet import pretrained
from mnist_resnet import reporting
from mnist_resnet import rundir
from mnist_resnet import steps
from mnist_resnet import validation
from mnist_resnet.errors import ConfigError, Preempted

# Called right after each train step is dispatched, metrics still on device.
StepObserver = Callable[[int, Mapping[str, jax.Array]], None]


def total_train_steps(config: ml_collections.ConfigDict,
                      num_examples: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  spe = order.steps_per_epoch(num_examples, config.batch_size)
  return max(1, int(round(config.num_epochs * spe)))


def eval_period(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """Steps between evaluations; 0 means only at the end."""
  if config.eval_every_steps == -1:
    return order.steps_per_epoch(num_examples, config.batch_size)
  return int(config.eval_every_steps)


def load_data(config: ml_collections.ConfigDict) -> dict[str, mnist.Split]:
  splits = mnist.load_mnist(config.data_dir, download=config.download)
  validation.validate_batch_fits(config, len(splits["train"].labels))
  return splits


@dataclasses.dataclass(frozen=True)
class Program:
  """What a config compiles to: mesh, model, optimizer and the jitted train
  step. Building one allocates nothing; `initial_state` does."""
  mesh: jax.sharding.Mesh
  model_name: str
  model: models.ResNet
  model_input: preprocess.ModelInput
  tx: optax.GradientTransformation
  groups: tuple[str, ...]
  keep_ema: bool
  total_steps: int
  train_step: Callable
  init_variables: Callable

  def abstract_state(self) -> steps.TrainState:
    """Shapes, dtypes and shardings of the train state; nothing allocated."""
    rep = parallel.replicated(self.mesh)
    shapes = jax.eval_shape(lambda: steps.new_state(
        self.init_variables(), self.tx, self.groups, self.keep_ema))
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)

  def initial_state(self, weights: str | None = None) -> steps.TrainState:
    """Step 0: the backbone from `weights` (a Keras file or a converted
    directory, see `pretrained.load_backbone`) when given, else random."""
    variables = self.init_variables()
    if weights is not None:
      variables = parallel.replicate(
          pretrained.load_backbone(weights, variables, self.model_name),
          self.mesh)
    return jax.jit(lambda v: steps.new_state(v, self.tx, self.groups,
                                             self.keep_ema),
                   out_shardings=parallel.replicated(self.mesh))(variables)


def create_model(config: ml_collections.ConfigDict) -> models.ResNet:
  return models.create_model(
      config.model, num_classes=mnist.NUM_CLASSES, dtype=config.dtype,
      hidden_units=tuple(int(u) for u in config.hidden_units),
      dropout_rate=config.dropout_rate, bn_momentum=config.bn_momentum,
      zero_init_residual=config.zero_init_residual)


def model_input(config: ml_collections.ConfigDict) -> preprocess.ModelInput:
  return preprocess.ModelInput(
      image_size=config.image_size, convention=config.input_convention,
      dtype=models.DTYPES[config.dtype], max_shift=int(config.aug_max_shift),
      max_rotation_deg=float(config.aug_max_rotation),
      max_scale=float(config.aug_max_scale))


def build_program(config: ml_collections.ConfigDict,
                  num_train_examples: int) -> Program:
  mesh = parallel.create_mesh()
  model = create_model(config)
  total = total_train_steps(config, num_train_examples)
  schedule = optim.create_schedule(config.learning_rate, config.batch_size,
                                   config.warmup_steps, total)
  groups = optim.trainable_groups(config.trainable)
  tx = optim.create_optimizer(
      schedule, optimizer=config.optimizer, groups=groups,
      weight_decay=config.weight_decay, momentum=config.momentum,
      nesterov=config.nesterov,
      backbone_lr_multiplier=config.backbone_lr_multiplier,
      grad_clip_norm=config.grad_clip_norm)
  inputs = model_input(config)
  rep = parallel.replicated(mesh)
  train_step = jax.jit(
      steps.make_train_step(model, tx, schedule, model_input=inputs,
                            groups=groups,
                            label_smoothing=config.label_smoothing,
                            ema_decay=config.ema_decay, seed=config.seed),
      in_shardings=(rep, parallel.batch_sharding(mesh)),
      out_shardings=(rep, rep), donate_argnums=(0,))
  size, dtype = config.image_size, models.DTYPES[config.dtype]
  init_key = jax.random.fold_in(jax.random.key(config.seed), 0)

  def init_variables():
    dummy = jnp.zeros((1, size, size, 3), dtype)
    return model.init({"params": init_key, "dropout": init_key}, dummy,
                      train=False)

  return Program(mesh=mesh, model_name=config.model, model=model, model_input=inputs, tx=tx,
                 groups=groups, keep_ema=config.ema_decay > 0,
                 total_steps=total, train_step=train_step,
                 init_variables=jax.jit(init_variables, out_shardings=rep))


def restore_or_init(config: ml_collections.ConfigDict, program: Program,
                    ckpt: checkpoint_lib.Checkpointer
                    ) -> tuple[steps.TrainState, int | None]:
  """The state to start from, and the step it was restored from (or None).

  Order: the workdir's latest checkpoint, else the pretrained backbone
  (init=imagenet; resolved, downloaded if need be, before anything
  compiles), else random initialisation.
  """
  latest = ckpt.latest_step()
  if latest is None:
    weights = None
    if config.init == "imagenet":
      weights = pretrained.resolve_weights(config.pretrained_weights,
                                           config.model)
    return program.initial_state(weights), None
  logging.info("Resuming from %s/%d", ckpt.directory, latest)
  try:
    state = ckpt.restore(latest, program.abstract_state())
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(
        f"{ckpt.directory}/{latest} does not fit this config (model, "
        f"optimizer or trainable changed?): {str(e).splitlines()[0]}"
    ) from None
  if latest > program.total_steps:
    raise ConfigError(f"{ckpt.directory}/{latest} is past the run's "
                      f"{program.total_steps} steps; use a new workdir")
  return state, latest


@dataclasses.dataclass
class LoopEnd:
  """What the loop hands to the results."""
  state: steps.TrainState
  eval_results: dict[str, Any]
  train_totals: dict[str, Any]
  final_train_loss: float


def train_loop(config: ml_collections.ConfigDict, workdir: str,
               program: Program, state: steps.TrainState, start: int,
               splits: Mapping[str, mnist.Split],
               ckpt: checkpoint_lib.Checkpointer,
               on_step: StepObserver | None) -> LoopEnd:
  """Steps start + 1 .. total: train, log, evaluate, checkpoint, preempt."""
  total, mesh = program.total_steps, program.mesh
  num_train = len(splits["train"].labels)
  period = eval_period(config, num_train)
  evaluate = evaluator_lib.Evaluator(
      program.model, program.model_input, splits["test"],
      batch_size=config.eval_batch_size, mesh=mesh)
  batches = data.train_dataset(
      splits["train"], global_batch_size=config.batch_size, seed=config.seed,
      start_step=start, num_steps=total - start,
      process_index=jax.process_index(),
      process_count=jax.process_count()).as_numpy_iterator()
  reporter = reporting.Reporter(workdir, writes=jax.process_index() == 0,
                                total_steps=total, start_step=start)
  log = reporting.TrainLog(reporter, batch_size=config.batch_size,
                           log_every=config.log_every_steps,
                           total_steps=total, start_step=start)
  profile = reporting.ProfileWindow(
      rundir.profile_dir(workdir), num_steps=config.profile_steps,
      start_step=start, total_steps=total)
  watcher = preemption.PreemptionWatcher(ckpt.reached_preemption)
  meta = {"config": config.to_dict(), "devices": jax.device_count(),
          "processes": jax.process_count()}
  eval_results = None
  try:
    for step in range(start + 1, total + 1):
      profile.before_step(step)
      state, metrics = program.train_step(
          state, parallel.global_batch(next(batches), mesh))
      log.dispatched(step, metrics)
      profile.after_step(step, state)
      if on_step is not None:
        on_step(step, metrics)

      do_eval = step == total or (period and step % period == 0)
      do_ckpt = step == total or step % config.checkpoint_every_steps == 0
      if do_eval or do_ckpt:
        log.flush(step)   # Never save a diverged state.
      if do_eval:
        with log.paused():
          eval_results = evaluate(state)
        reporter.scalars(step, {k: eval_results[k]
                                for k in ("test_accuracy", "test_loss")})
      if do_ckpt:
        ckpt.save(step, state, meta={**meta, "step": step},
                  metrics=({"test_accuracy": eval_results["test_accuracy"]}
                           if do_eval else None))
      if step < total and watcher.should_stop(step):
        if not do_ckpt:
          log.flush(step)
          ckpt.save(step, state, meta={**meta, "step": step})
        ckpt.wait_until_finished()
        logging.warning("Preemption notice: saved %s/%d", ckpt.directory,
                        step)
        raise Preempted(step)
    jax.block_until_ready(state)
    totals = log.totals()
    if eval_results is None or start == total:
      eval_results = evaluate(state)
    ckpt.wait_until_finished()
  finally:
    profile.close()
    watcher.close()
    reporter.close()
  return LoopEnd(state=state, eval_results=eval_results, train_totals=totals,
                 final_train_loss=log.last_train_loss)


def final_results(config: ml_collections.ConfigDict, total_steps: int,
                  end: LoopEnd, *, start: int, resumed_from: int | None,
                  best_step: int | None) -> dict[str, Any]:
  """The record written to results.json."""
  return {
      "step": total_steps,
      **end.eval_results,
      "final_train_loss": end.final_train_loss,
      "params_sha256": steps.params_sha256(end.state.params),
      **end.train_totals,
      "steps_run": total_steps - start,
      "resumed_from": resumed_from,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "best_step": best_step,
      "config": config.to_dict(),
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       on_step: StepObserver | None = None) -> dict[str, Any]:
  """Trains per `config`, checkpoints into `workdir`, returns the results.

  `on_step(step, metrics)` observes the loop (benchmark.py times it this
  way); it must not wait for the metrics, or the loop would stall.
  """
  validation.validate_config(config)
  splits = load_data(config)
  program = build_program(config, len(splits["train"].labels))
  ckpt = checkpoint_lib.Checkpointer(
      rundir.checkpoint_dir(workdir),
      max_to_keep=config.max_checkpoints_to_keep)
  try:
    state, resumed_from = restore_or_init(config, program, ckpt)
    start = int(jax.device_get(state.step))
    logging.info(
        "%s: %d steps (%d per epoch), global batch %d on %d devices (%d "
        "processes), starting at step %d", config.model, program.total_steps,
        order.steps_per_epoch(len(splits["train"].labels), config.batch_size),
        config.batch_size, jax.device_count(), jax.process_count(), start)
    end = train_loop(config, workdir, program, state, start, splits, ckpt,
                     on_step)
    best_step = ckpt.best_step()
  finally:
    ckpt.close()
  results = final_results(config, program.total_steps, end, start=start,
                          resumed_from=resumed_from, best_step=best_step)
  if jax.process_index() == 0:
    rundir.write_results(workdir, results)
  logging.info("step %d: test_accuracy=%.4f test_loss=%.4f (%d examples)",
               results["step"], results["test_accuracy"],
               results["test_loss"], results["eval_examples"])
  return results
