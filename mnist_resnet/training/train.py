"""Training and evaluation: the orchestration, in the order the work happens.

Validate the config and the workdir (nothing allocated yet); take the
workdir (its lock, the saved config's check; a finished run's results are
returned untouched); load the data and build the program; restore the newest
good checkpoint, else initialise (pretrained backbone or scratch); run the
loop (evaluations, asynchronous checkpoints, signals); write the best
checkpoint's figures and results.json. A resumed run ends with the same
parameters as one that never stopped: docs/operations.md#resume.
"""

from __future__ import annotations

import contextlib
from typing import Any
from typing import Mapping

from absl import logging
import jax
import ml_collections

from mnist_resnet.core.errors import ConfigError
from mnist_resnet.core.errors import Preempted
from mnist_resnet.data import mnist
from mnist_resnet.data import order
from mnist_resnet.data import source
from mnist_resnet.data import split
from mnist_resnet.model import pretrained
from mnist_resnet.training import goodput
from mnist_resnet.training import loop as loop_lib
from mnist_resnet.training import preemption
from mnist_resnet.training import program as program_lib
from mnist_resnet.training import report as report_lib
from mnist_resnet.training import steps
from mnist_resnet.training import trained
from mnist_resnet.training import validation
from mnist_resnet.workdir import checkpoints as checkpoint_lib
from mnist_resnet.workdir.workdir import ADDED_KEYS
from mnist_resnet.workdir.workdir import Workdir
from mnist_resnet.workdir.workdir import config_changes


def load_data(config: ml_collections.ConfigDict
              ) -> tuple[dict[str, mnist.Split], dict[str, Any]]:
  """The splits the run uses (validation held out of train) and what
  results.json records of them."""
  loaded = source.load(config.dataset, config.data_dir,
                       download=config.download)
  splits = split.hold_out_validation(loaded.splits,
                                     config.validation_examples)
  validation.validate_splits(config, splits)
  return splits, source.record(config.dataset, loaded, splits)


def restore_or_init(config: ml_collections.ConfigDict,
                    program: program_lib.Program, workdir: Workdir
                    ) -> tuple[steps.TrainState, int | None]:
  """The state to start from, and the step it was restored from (or None).

  Order: the workdir's newest checkpoint that restores and matches its
  digest (damaged ones are set aside), else the pretrained backbone
  (init=imagenet; resolved, downloaded if need be, before anything
  compiles), else random initialisation.
  """
  ckpt = workdir.checkpointer
  found = ckpt.restore_latest_good(program.abstract_state(),
                                   workdir.set_aside_dir)
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


def check_fresh_start(config: ml_collections.ConfigDict,
                      program: program_lib.Program, workdir: Workdir) -> None:
  """A fresh start's pretrained weights, found (downloaded if need be) and
  checked against the model's shapes now, before the step compiles: a file
  that does not fit is one line in seconds, not after a compilation."""
  if (config.init != "imagenet"
      or workdir.checkpointer.latest_step() is not None):
    return
  weights = pretrained.resolve_weights(config.pretrained_weights, config.model)
  pretrained.load_backbone(weights, jax.eval_shape(program.init_variables),
                           config.model)


def check_same_data(workdir: Workdir, dataset: Mapping[str, Any]) -> None:
  """A resumed run reads the data its checkpoints were trained on: the same
  version and split sizes (tfds:NAME without a version reads the newest one
  prepared, which may have changed since). Before anything compiles."""
  ckpt = workdir.checkpointer
  latest = ckpt.latest_step()
  if latest is None:
    return
  try:
    saved = ckpt.read_meta(latest).get(loop_lib.DATASET)
  except checkpoint_lib.DamagedCheckpoint:
    return  # Set aside by the restore, which tries the one before.
  if saved is not None and saved != dataset:
    raise ConfigError(
        f"{ckpt.directory}/{latest} was trained on {source.describe(saved)}, "
        f"this run reads {source.describe(dataset)}: name the version it was "
        "trained on (tfds:NAME:VERSION), or use a new workdir")


def best_results(workdir: Workdir, program: program_lib.Program,
                 data: loop_lib.LoopData, end: loop_lib.LoopEnd
                 ) -> dict[str, Any]:
  """The best-by-validation checkpoint's step and its accuracies."""
  ckpt = workdir.checkpointer
  best = ckpt.best_step()
  if best is None:
    return {"best_step": None}
  if best == end.step:
    found = end.eval_results
  else:
    found = loop_lib.evaluate(
        data.evaluators, ckpt.restore(best, program.abstract_state()), best)
  return {"best_step": best,
          "best_validation_accuracy": found["validation_accuracy"],
          "best_test_accuracy": found["test_accuracy"]}


def report_pictures(config: ml_collections.ConfigDict, workdir: Workdir,
                    program: program_lib.Program, end: loop_lib.LoopEnd,
                    test: mnist.Split) -> None:
  """The final state's evaluation report in the workdir (eval.json,
  confusion.png, errors.png, curves.png: see report.py), and the
  confusion matrix in TensorBoard. Drawn from the final evaluation's
  logits: no second pass over the test set."""
  step = int(jax.device_get(end.state.step))
  params, batch_stats = steps.eval_variables(end.state)
  model = trained.TrainedModel(
      workdir=workdir.location, step=step, config=config,
      model=program.model, model_input=program.model_input, params=params,
      batch_stats=batch_stats, mesh=program.mesh)
  report = report_lib.report(model, test, workdir.path,
                             logits=end.test_logits,
                             figures=end.test_figures)
  workdir.metrics.image(step, report_lib.CONFUSION_TAG, report.confusion_png)


def final_results(config: ml_collections.ConfigDict, end: loop_lib.LoopEnd,
                  best: Mapping[str, Any], phases: goodput.Goodput,
                  dataset: Mapping[str, Any]) -> dict[str, Any]:
  """The record written to results.json: the loop's `train_figures` (null
  figures where no checkpoint recorded them), `phases` this invocation's
  time, `dataset` source.record's."""
  figures = end.figures or {"resumed_from": end.step, "steps_run": 0}
  return {
      "step": end.step,
      **end.eval_results,
      **best,
      **end.clock.results(),
      "final_train_loss": figures.get("final_train_loss"),
      "params_sha256": steps.params_sha256(end.state.params),
      "train_seconds": figures.get("train_seconds"),
      "images_per_sec": figures.get("images_per_sec"),
      "steps_run": figures["steps_run"],
      # What a save costs the loop's thread: median over the saves before
      # the final one.
      "checkpoint_blocking_seconds": figures.get(
          "checkpoint_blocking_seconds"),
      "checkpoints_saved": figures.get("checkpoints_saved", 0),
      "resumed_from": figures["resumed_from"],
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "dataset": dict(dataset),
      "time": phases.breakdown(),
      "versions": goodput.versions(),
      "config": config.to_dict(),
  }


def finished_results(config: ml_collections.ConfigDict, workdir: Workdir
                     ) -> dict[str, Any] | None:
  """results.json of this run if it already finished (a scheduler's retry
  of a done job), else None: only for the same config, and only if its
  step is the newest checkpoint's."""
  results = workdir.results()
  if (results is None
      or results.get("step") != workdir.checkpointer.latest_step()):
    return None
  saved = results.get("config")
  if not isinstance(saved, dict):
    return None  # Not a run's record: written again from its checkpoint.
  if any(saved.get(k) != config[k] for k in (
      "num_train_steps", "num_epochs", "target_accuracy", "stop_at_target")):
    return None  # Asked to train longer, or to another end.
  if config_changes({**ADDED_KEYS, **saved}, config.to_dict()):
    return None  # Not this run's: written again from its checkpoint.
  return results


def open_run(config: ml_collections.ConfigDict, location: str,
             stack: contextlib.ExitStack, signals: preemption.StopSignals
             ) -> Workdir:
  """Takes the workdir: its lock (process 0; one lock per run), the saved
  config's check, and its checkpoints; all given back when `stack` closes."""
  workdir = Workdir(location)
  if jax.process_index() == 0:
    # The clean-up first: a signal right after the lock is taken still
    # releases it (release_lock does nothing before it is held).
    signals.on_early_exit(workdir.release_lock)
    workdir.take_lock()
    stack.callback(workdir.release_lock)
  workdir.open_checkpointer(max_to_keep=config.max_checkpoints_to_keep,
                            keep_best=config.validation_examples > 0)
  stack.push(workdir)  # Workdir.__exit__: closes it.
  # Against config.json, or the newest checkpoint's config when config.json
  # is missing or damaged: then config.json is written again from it, also
  # when this config is refused.
  try:
    workdir.check_resume_config(config.to_dict())
  finally:
    if workdir.config_from_checkpoint() and jax.process_index() == 0:
      workdir.restore_config_file(workdir.saved_config())
  return workdir


def log_start(config: ml_collections.ConfigDict, program: program_lib.Program,
              train_examples: int, start: int) -> None:
  logging.info(
      "%s: %d steps (%d per epoch), global batch %d on %d devices (%d "
      "processes), starting at step %d", config.model, program.total_steps,
      order.steps_per_epoch(train_examples, config.batch_size),
      config.batch_size, jax.device_count(), jax.process_count(), start)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       on_step: loop_lib.StepObserver | None = None,
                       signals: preemption.StopSignals | None = None
                       ) -> dict[str, Any]:
  """Trains per `config`, checkpoints into `workdir`, returns the results.

  `on_step(step, metrics)` observes the loop (benchmark.py times it this
  way); it must not wait for the metrics, or the loop would stall.
  `signals`: the process's StopSignals (train.py installs them first thing);
  by default installed here for the duration of the run.
  """
  phases = goodput.Goodput()  # Where this invocation's time goes.
  validation.validate_config(config)
  validation.validate_workdir(workdir)
  with contextlib.ExitStack() as stack:
    if signals is None:
      signals = stack.enter_context(preemption.StopSignals())
    run = open_run(config, workdir, stack, signals)
    finished = finished_results(config, run)
    if finished is not None:
      logging.info("%s already holds this run's results (step %d: "
                   "test_accuracy=%s); nothing to do", run.results_file,
                   finished["step"], finished.get("test_accuracy"))
      return finished
    splits, dataset = load_data(config)
    program = program_lib.build_program(config, len(splits["train"].labels))
    check_fresh_start(config, program, run)
    check_same_data(run, dataset)
    with phases.phase("compilation"):
      program = program.compiled()  # Out of memory: one line, nothing run.
    state, _ = restore_or_init(config, program, run)
    run.checkpointer.warm_up(state)
    if jax.process_index() == 0:
      run.save_config(config.to_dict())
    start = int(jax.device_get(state.step))
    log_start(config, program, len(splits["train"].labels), start)
    data = loop_lib.LoopData(
        train=splits["train"],
        evaluators=loop_lib.create_evaluators(config, program, splits),
        dataset=dataset)
    run.open_metrics(writes=jax.process_index() == 0,
                     total_steps=program.total_steps, start_step=start)
    end = loop_lib.train_loop(config, program, state, data, run, signals,
                              on_step)
    for phase, seconds in end.seconds.items():
      phases.add(phase, seconds)
    with phases.phase("report"):
      best = best_results(run, program, data, end)
      report_pictures(config, run, program, end, splits["test"])
    results = final_results(config, end, best, phases, dataset)
  if jax.process_index() == 0:
    # Last: results.json marks the run done (a kill before it leaves a
    # run that a rerun reports again from its final checkpoint).
    run.write_results(results)
  stopped = signals.received()
  logging.info("step %d: test_accuracy=%.4f test_loss=%.4f (%d examples)",
               results["step"], results["test_accuracy"],
               results["test_loss"], results["eval_examples"])
  if stopped is not None:  # Ctrl-C or SIGTERM during the report.
    raise Preempted(results["step"], stopped, finished=True)
  return results
