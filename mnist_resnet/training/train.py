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
from typing import Any
from typing import Callable
from typing import Mapping

from absl import logging
import jax
import ml_collections

from mnist_resnet.core.errors import ConfigError
from mnist_resnet.data import mnist
from mnist_resnet.data import order
from mnist_resnet.data import split
from mnist_resnet.model import pretrained
from mnist_resnet.training import checkpoint as checkpoint_lib
from mnist_resnet.training import evaluator as evaluator_lib
from mnist_resnet.training import loop as loop_lib
from mnist_resnet.training import preemption
from mnist_resnet.training import program as program_lib
from mnist_resnet.training import report as report_lib
from mnist_resnet.training import reporting
from mnist_resnet.training import steps
from mnist_resnet.training import trained
from mnist_resnet.training import validation
from mnist_resnet.workdir import rundir
from mnist_resnet.workdir import runlock


def load_data(config: ml_collections.ConfigDict) -> dict[str, mnist.Split]:
  splits = split.hold_out_validation(
      mnist.load_mnist(config.data_dir, download=config.download),
      config.validation_examples)
  validation.validate_splits(config, splits)
  return splits


def restore_or_init(config: ml_collections.ConfigDict,
                    program: program_lib.Program,
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


def best_results(ckpt: checkpoint_lib.Checkpointer,
                 program: program_lib.Program,
                 evaluators: list[evaluator_lib.Evaluator],
                 end: loop_lib.LoopEnd
                 ) -> dict[str, Any]:
  """The best-by-validation checkpoint's step and its accuracies."""
  best = ckpt.best_step()
  if best is None:
    return {"best_step": None}
  if best == program.total_steps:
    found = end.eval_results
  else:
    found = loop_lib.evaluate(
        evaluators, ckpt.restore(best, program.abstract_state()),
                     best)
  return {"best_step": best,
          "best_validation_accuracy": found["validation_accuracy"],
          "best_test_accuracy": found["test_accuracy"]}


def report_pictures(config: ml_collections.ConfigDict, workdir: str,
                    program: program_lib.Program, end: loop_lib.LoopEnd,
                    test: mnist.Split,
                    reporter: reporting.Reporter) -> None:
  """The final state's evaluation report in the workdir (eval.json,
  confusion.png, errors.png, curves.png: see report.py), and the
  confusion matrix in TensorBoard. Drawn from the final evaluation's
  logits: no second pass over the test set."""
  step = int(jax.device_get(end.state.step))
  params, batch_stats = steps.eval_variables(end.state)
  model = trained.TrainedModel(
      workdir=workdir, step=step, config=config, model=program.model,
      model_input=program.model_input, params=params,
      batch_stats=batch_stats, mesh=program.mesh)
  report = report_lib.report(model, test, rundir.workdir_path(workdir),
                               logits=end.test_logits)
  reporter.image(step, report_lib.CONFUSION_TAG, report.confusion_png)


def final_results(config: ml_collections.ConfigDict, total_steps: int,
                  end: loop_lib.LoopEnd, *, start: int,
                  resumed_from: int | None,
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
                       on_step: loop_lib.StepObserver | None = None,
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
    program = program_lib.build_program(config, len(splits["train"].labels))
    state, resumed_from = restore_or_init(config, program, ckpt, workdir)
    if jax.process_index() == 0:
      rundir.save_config(workdir, config.to_dict())
    start = int(jax.device_get(state.step))
    logging.info(
        "%s: %d steps (%d per epoch), global batch %d on %d devices (%d "
        "processes), starting at step %d", config.model, program.total_steps,
        order.steps_per_epoch(len(splits["train"].labels), config.batch_size),
        config.batch_size, jax.device_count(), jax.process_count(), start)
    evaluators = loop_lib.create_evaluators(config, program, splits)
    reporter = stack.enter_context(contextlib.closing(reporting.Reporter(
        workdir, writes=jax.process_index() == 0,
        total_steps=program.total_steps, start_step=start)))
    end = loop_lib.train_loop(config, workdir, program, state, start, splits,
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
