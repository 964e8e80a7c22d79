"""Training and evaluation: the orchestration, in the order the work happens.

  1. validate the config and the workdir (nothing allocated yet);
  2. take the workdir: its lock, the saved config's check, a finished run's
     results (returned untouched);
  3. load and check the data, build the program: mesh, model, optimizer,
     jitted train step;
  4. restore the newest good checkpoint, else initialise (pretrained backbone
     or scratch);
  5. the loop: per-process tf.data shard -> global array -> train step (or
     the device pipeline: the step gathers its batch from the dataset on the
     devices), with periodic evaluation, asynchronous checkpoints and
     signals;
  6. the best checkpoint's figures, results.json.

Data order, augmentation and dropout are pure functions of (seed, step), so a
run resumed from a checkpoint ends with the same parameters as one that never
stopped (same config, same device count).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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
from mnist_resnet import runlock
from mnist_resnet import steps
from mnist_resnet import trained
from mnist_resnet import validation
from mnist_resnet.errors import ConfigError, Diverged, Preempted, TrainingError

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
  splits = hold_out_validation(
      mnist.load_mnist(config.data_dir, download=config.download),
      config.validation_examples)
  validation.validate_splits(config, splits)
  return splits


def hold_out_validation(splits: dict[str, mnist.Split],
                        num_examples: int) -> dict[str, mnist.Split]:
  """Moves the last `num_examples` training examples into a "validation"
  split: the best checkpoint is chosen on it, never on the test set."""
  if num_examples == 0:
    return splits
  train = splits["train"]
  if not 0 < num_examples < len(train.labels):
    raise ConfigError(
        f"config.validation_examples={num_examples} must be in [0, "
        f"{len(train.labels)}): the training split holds "
        f"{len(train.labels)} examples")
  keep = len(train.labels) - num_examples
  return {**splits,
          "train": mnist.Split(train.images[:keep], train.labels[:keep]),
          "validation": mnist.Split(train.images[keep:], train.labels[keep:])}


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
      zero_init_residual=config.zero_init_residual,
      use_conv_as_dot=models.conv_as_dot_on(config.conv_as_dot,
                                            jax.default_backend()))


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
  step_fn = steps.make_train_step(model, tx, schedule, model_input=inputs,
                                  groups=groups,
                                  label_smoothing=config.label_smoothing,
                                  ema_decay=config.ema_decay, seed=config.seed)
  batch_sharding = parallel.batch_sharding(mesh)
  if config.input_pipeline == "device":
    # The step gathers its own batch from the dataset on the devices.
    step_fn = data.with_device_batches(
        step_fn, global_batch_size=config.batch_size, mesh=mesh)
    batch_sharding = rep
  train_step = jax.jit(step_fn, in_shardings=(rep, batch_sharding),
                       out_shardings=(rep, rep), donate_argnums=(0,))
  size, dtype = config.image_size, models.DTYPES[config.dtype]
  init_key = jax.random.fold_in(jax.random.key(config.seed), 0)

  def init_variables():
    dummy = jnp.zeros((1, size, size, 3), dtype)
    return model.init({"params": init_key, "dropout": init_key}, dummy,
                      train=False)

  return Program(mesh=mesh, model_name=config.model, model=model,
                 model_input=inputs, tx=tx, groups=groups,
                 keep_ema=config.ema_decay > 0, total_steps=total,
                 train_step=train_step,
                 init_variables=jax.jit(init_variables, out_shardings=rep))


def restore_or_init(config: ml_collections.ConfigDict, program: Program,
                    ckpt: checkpoint_lib.Checkpointer, workdir: str
                    ) -> tuple[steps.TrainState, int | None]:
  """The state to start from, and the step it was restored from (or None).

  Order: the workdir's newest checkpoint that restores and matches its
  digest (damaged ones are set aside), else the pretrained backbone
  (init=imagenet; resolved, downloaded if need be, before anything
  compiles), else random initialisation.
  """
  found = ckpt.restore_latest_good(program.abstract_state(),
                                   rundir.set_aside_dir(workdir))
  if found is None:
    weights = None
    if config.init == "imagenet":
      weights = pretrained.resolve_weights(config.pretrained_weights,
                                           config.model)
    return program.initial_state(weights), None
  state, latest = found
  logging.info("Resumed from %s/%d", ckpt.directory, latest)
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
  test_logits: np.ndarray  # The final evaluation's, for the report.


def create_evaluators(config: ml_collections.ConfigDict, program: Program,
                      splits: Mapping[str, mnist.Split]
                      ) -> list[evaluator_lib.Evaluator]:
  """The test set's evaluator, then the validation split's if held out."""
  return [evaluator_lib.Evaluator(
      program.model, program.model_input, splits[name],
      batch_size=config.eval_batch_size, mesh=program.mesh, name=name,
      pipeline=config.input_pipeline)
          for name in ("test", "validation") if name in splits]


def evaluate(evaluators: list[evaluator_lib.Evaluator],
             state: steps.TrainState, step: int) -> dict[str, Any]:
  """Every evaluator's results; a non-finite loss means a diverged state."""
  results = {}
  for e in evaluators:
    results.update(e(state))
  losses = {k: v for k, v in results.items() if k.endswith("_loss")}
  if not all(np.isfinite(v) for v in losses.values()):
    raise Diverged(f"non-finite evaluation loss at step {step} ({losses})",
                   step + 1)
  return results


def _eval_scalars(results: Mapping[str, Any]) -> dict[str, float]:
  return {k: v for k, v in results.items()
          if k.endswith(("_accuracy", "_loss")) and not k.startswith("per_")}


def set_aside_diverged(ckpt: checkpoint_lib.Checkpointer, e: Diverged,
                       workdir: str) -> TrainingError:
  """The error to end a diverged run with, once the checkpoint of the state
  that diverged (step e.step - 1), if saved, is moved aside."""
  bad = e.step - 1
  ckpt.wait_until_finished()
  said = f"{e}; the state of step {bad} is not good"
  if bad in ckpt.all_steps():
    moved = ckpt.set_aside(bad, rundir.set_aside_dir(workdir), "diverged")
    said += f" (its checkpoint is now {moved})"
  latest = ckpt.latest_step()
  said += (f"; the latest checkpoint, step {latest}, is good"
           if latest is not None else "; no checkpoint is left")
  return TrainingError(said + "; lower the learning rate or clip gradients")


def train_inputs(config: ml_collections.ConfigDict, program: Program,
                 train: mnist.Split, start: int, total: int) -> Iterator[Any]:
  """The train step's second argument for steps start + 1 .. total.

  tfdata: the global batch, assembled from this process's rows. device: the
  dataset on the devices and the epoch's permutation; the step gathers the
  batch itself.
  """
  mesh = program.mesh
  if config.input_pipeline == "device":
    return data.device_train_inputs(
        data.to_devices(train, mesh), global_batch_size=config.batch_size,
        seed=config.seed, start_step=start, mesh=mesh)
  local = data.train_dataset(
      train, global_batch_size=config.batch_size, seed=config.seed,
      start_step=start, num_steps=total - start,
      process_index=jax.process_index(),
      process_count=jax.process_count()).as_numpy_iterator()
  return (parallel.global_batch(batch, mesh) for batch in local)


def train_loop(config: ml_collections.ConfigDict, workdir: str,
               program: Program, state: steps.TrainState, start: int,
               splits: Mapping[str, mnist.Split],
               evaluators: list[evaluator_lib.Evaluator],
               ckpt: checkpoint_lib.Checkpointer,
               reporter: reporting.Reporter,
               signals: preemption.StopSignals,
               check_lock: Callable[[], None],
               on_step: StepObserver | None) -> LoopEnd:
  """Steps start + 1 .. total: train, log, evaluate, checkpoint, stop on a
  signal.

  A checkpoint is only good once the loss computed from its parameters is
  known finite: that is the next step's train loss, fetched right after the
  step following each save; a non-finite one sets the checkpoint aside.
  """
  total = program.total_steps
  period = eval_period(config, len(splits["train"].labels))
  inputs = train_inputs(config, program, splits["train"], start, total)
  log = reporting.TrainLog(reporter, batch_size=config.batch_size,
                           log_every=config.log_every_steps,
                           total_steps=total, start_step=start)
  profile = reporting.ProfileWindow(
      rundir.profile_dir(workdir), num_steps=config.profile_steps,
      start_step=start, total_steps=total)
  meta = {"config": config.to_dict(), "devices": jax.device_count(),
          "processes": jax.process_count()}

  def save(step, eval_results):
    metrics = None
    if ckpt.keep_best and eval_results is not None:
      metrics = {checkpoint_lib.BEST_METRIC:
                 eval_results[checkpoint_lib.BEST_METRIC]}
    check_lock()  # Never write over a run that took the workdir over.
    ckpt.save(step, state, meta={**meta, "step": step}, metrics=metrics)
    reporter.flush()

  eval_results = None
  verify_step = start + 1  # The loss of the state we start from.
  signals.loop_started(multiprocess=jax.process_count() > 1)
  try:
    for step in range(start + 1, total + 1):
      profile.before_step(step)
      state, metrics = program.train_step(state, next(inputs))
      log.dispatched(step, metrics)
      profile.after_step(step, state)
      if on_step is not None:
        on_step(step, metrics)
      if step == verify_step:
        log.flush(step)

      do_eval = step == total or (period and step % period == 0)
      # With a best checkpoint to keep, every evaluation is saved.
      do_ckpt = (step == total or step % config.checkpoint_every_steps == 0
                 or (ckpt.keep_best and do_eval))
      if do_eval or do_ckpt:
        log.flush(step)   # Never save a state whose own step diverged.
      if do_eval:
        with log.paused():
          eval_results = evaluate(evaluators, state, step)
        reporter.scalars(step, _eval_scalars(eval_results))
      if do_ckpt:
        save(step, eval_results if do_eval else None)
        verify_step = step + 1
      signum = signals.stop_requested(step, ckpt.reached_preemption)
      if step < total and signum is not None:
        if not do_ckpt:
          log.flush(step)
          save(step, None)
        ckpt.wait_until_finished()
        raise Preempted(step, signum)
    jax.block_until_ready(state)
    totals = log.totals()
    if eval_results is None:  # Nothing left to train: resumed at the end.
      eval_results = evaluate(evaluators, state, total)
    test_logits = evaluators[0].logits_of_last_call()
    ckpt.wait_until_finished()
  except Diverged as e:
    raise set_aside_diverged(ckpt, e, workdir) from None
  finally:
    profile.close()
    reporter.flush()
  return LoopEnd(state=state, eval_results=eval_results, train_totals=totals,
                 final_train_loss=log.last_train_loss,
                 test_logits=test_logits)


def best_results(ckpt: checkpoint_lib.Checkpointer, program: Program,
                 evaluators: list[evaluator_lib.Evaluator], end: LoopEnd
                 ) -> dict[str, Any]:
  """The best-by-validation checkpoint's step and its accuracies."""
  best = ckpt.best_step()
  if best is None:
    return {"best_step": None}
  if best == program.total_steps:
    found = end.eval_results
  else:
    found = evaluate(evaluators, ckpt.restore(best, program.abstract_state()),
                     best)
  return {"best_step": best,
          "best_validation_accuracy": found["validation_accuracy"],
          "best_test_accuracy": found["test_accuracy"]}


def report_pictures(config: ml_collections.ConfigDict, workdir: str,
                    program: Program, end: LoopEnd, test: mnist.Split,
                    reporter: reporting.Reporter) -> None:
  """The final state's evaluation report in the workdir (eval.json,
  confusion.png, errors.png, curves.png: see evaluate.py), and the
  confusion matrix in TensorBoard. Drawn from the final evaluation's
  logits: no second pass over the test set."""
  # Here, not at the top: matplotlib's import (and its font cache) is paid
  # at the end of a run, never by one that stops early.
  from mnist_resnet import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  step = int(jax.device_get(end.state.step))
  params, batch_stats = steps.eval_variables(end.state)
  model = trained.TrainedModel(
      workdir=workdir, step=step, config=config, model=program.model,
      model_input=program.model_input, params=params,
      batch_stats=batch_stats, mesh=program.mesh)
  report = evaluate_lib.report(model, test, rundir.workdir_path(workdir),
                               logits=end.test_logits)
  reporter.image(step, evaluate_lib.CONFUSION_TAG, report.confusion_png)


def final_results(config: ml_collections.ConfigDict, total_steps: int,
                  end: LoopEnd, *, start: int, resumed_from: int | None,
                  best: Mapping[str, Any]) -> dict[str, Any]:
  """The record written to results.json."""
  return {
      "step": total_steps,
      **end.eval_results,
      **best,
      "final_train_loss": end.final_train_loss,
      "params_sha256": steps.params_sha256(end.state.params),
      **end.train_totals,
      "steps_run": total_steps - start,
      "resumed_from": resumed_from,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "config": config.to_dict(),
  }


def finished_results(config: ml_collections.ConfigDict, workdir: str,
                     ckpt: checkpoint_lib.Checkpointer
                     ) -> dict[str, Any] | None:
  """results.json of this run if it already finished (a scheduler's retry
  of a done job), else None."""
  results = rundir.read_json(rundir.results_path(workdir))
  if results is None or results.get("step") != ckpt.latest_step():
    return None
  saved = results.get("config", {})
  if any(saved.get(k) != config[k] for k in ("num_train_steps", "num_epochs")):
    return None  # Asked to train longer.
  return results


def open_run(config: ml_collections.ConfigDict, workdir: str,
             stack: contextlib.ExitStack, signals: preemption.StopSignals
             ) -> tuple[checkpoint_lib.Checkpointer, Callable[[], None]]:
  """Takes the workdir: its lock (process 0; one lock per run), the saved
  config's check, and the checkpoints. Returns them with the lock's check,
  which raises once another run has taken the workdir over."""
  check_lock = lambda: None
  if jax.process_index() == 0:
    lock = runlock.acquire(workdir)
    stack.callback(lock.release)
    signals.on_early_exit(lock.release)
    check_lock = lock.check
  rundir.check_resume_config(workdir, config.to_dict())
  rundir.check_is_directory(rundir.checkpoint_dir(workdir))
  ckpt = checkpoint_lib.Checkpointer(
      rundir.checkpoint_dir(workdir),
      max_to_keep=config.max_checkpoints_to_keep,
      keep_best=config.validation_examples > 0)
  stack.callback(ckpt.close)
  return ckpt, check_lock


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       on_step: StepObserver | None = None,
                       signals: preemption.StopSignals | None = None
                       ) -> dict[str, Any]:
  """Trains per `config`, checkpoints into `workdir`, returns the results.

  `on_step(step, metrics)` observes the loop (benchmark.py times it this
  way); it must not wait for the metrics, or the loop would stall.
  `signals`: the process's StopSignals (train.py installs them first thing);
  by default installed here for the duration of the run.
  """
  validation.validate_config(config)
  validation.validate_workdir(workdir)
  with contextlib.ExitStack() as stack:
    if signals is None:
      signals = stack.enter_context(preemption.StopSignals())
    ckpt, check_lock = open_run(config, workdir, stack, signals)
    finished = finished_results(config, workdir, ckpt)
    if finished is not None:
      logging.info("%s already holds this run's results (step %d: "
                   "test_accuracy=%s); nothing to do",
                   rundir.results_path(workdir), finished["step"],
                   finished.get("test_accuracy"))
      return finished
    splits = load_data(config)
    program = build_program(config, len(splits["train"].labels))
    state, resumed_from = restore_or_init(config, program, ckpt, workdir)
    if jax.process_index() == 0:
      rundir.save_config(workdir, config.to_dict())
    start = int(jax.device_get(state.step))
    logging.info(
        "%s: %d steps (%d per epoch), global batch %d on %d devices (%d "
        "processes), starting at step %d", config.model, program.total_steps,
        order.steps_per_epoch(len(splits["train"].labels), config.batch_size),
        config.batch_size, jax.device_count(), jax.process_count(), start)
    evaluators = create_evaluators(config, program, splits)
    reporter = stack.enter_context(contextlib.closing(reporting.Reporter(
        workdir, writes=jax.process_index() == 0,
        total_steps=program.total_steps, start_step=start)))
    end = train_loop(config, workdir, program, state, start, splits,
                     evaluators, ckpt, reporter, signals, check_lock, on_step)
    best = best_results(ckpt, program, evaluators, end)
    report_pictures(config, workdir, program, end, splits["test"], reporter)
  results = final_results(config, program.total_steps, end, start=start,
                          resumed_from=resumed_from, best=best)
  if jax.process_index() == 0:
    rundir.write_results(workdir, results)
  logging.info("step %d: test_accuracy=%.4f test_loss=%.4f (%d examples)",
               results["step"], results["test_accuracy"],
               results["test_loss"], results["eval_examples"])
  return results
