"""The training loop: steps start + 1 .. total, with periodic evaluation,
asynchronous checkpoints, metrics fetched one logged step late, and stop
signals. A checkpoint is only good once the loss computed from its
parameters is known finite (the next step's train loss).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Mapping

import jax
import ml_collections
import numpy as np

from mnist_resnet.core import parallel
from mnist_resnet.core.errors import Diverged
from mnist_resnet.core.errors import Preempted
from mnist_resnet.core.errors import TrainingError
from mnist_resnet.data import input_pipeline
from mnist_resnet.data import mnist
from mnist_resnet.data import order
from mnist_resnet.training import evaluator as evaluator_lib
from mnist_resnet.training import goodput
from mnist_resnet.training import preemption
from mnist_resnet.training import program as program_lib
from mnist_resnet.training import progress
from mnist_resnet.training import steps
from mnist_resnet.workdir import checkpoints as checkpoint_lib
from mnist_resnet.workdir.workdir import Workdir

# The final checkpoint's meta key for `train_figures`.
TRAIN_FIGURES = "train_figures"
# Every checkpoint's meta key for the data it was trained on
# (source.record's).
DATASET = "dataset"

# Called right after each train step is dispatched, metrics still on device.
StepObserver = Callable[[int, Mapping[str, jax.Array]], None]


def eval_period(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """Steps between evaluations; 0 means only at the end."""
  if config.eval_every_steps == -1:
    return order.steps_per_epoch(num_examples, config.batch_size)
  return int(config.eval_every_steps)


@dataclasses.dataclass
class LoopEnd:
  """What the loop hands to the results."""
  state: steps.TrainState
  # The step the run ended at: the total, or where it reached its target.
  step: int
  eval_results: dict[str, Any]
  clock: goodput.TargetClock
  # This invocation's seconds in the loop, by phase (see `_Timer`).
  seconds: dict[str, float]
  # `train_figures` at the final step; resumed at the end, those its meta
  # holds (None for a checkpoint saved before they were).
  figures: dict[str, Any] | None
  # The final test evaluation's logits and figures, for the report.
  test_logits: np.ndarray
  test_figures: dict[str, Any]


def create_evaluators(config: ml_collections.ConfigDict,
                      program: program_lib.Program,
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


def set_aside_diverged(workdir: Workdir, e: Diverged) -> TrainingError:
  """The error to end a diverged run with, once the checkpoint of the state
  that diverged (step e.step - 1), if saved, is moved aside."""
  bad = e.step - 1
  ckpt = workdir.checkpointer
  ckpt.wait_until_finished()
  said = f"{e}; the state of step {bad} is not good"
  if bad in ckpt.all_steps():
    moved = ckpt.set_aside(bad, workdir.set_aside_dir, "diverged")
    said += f" (its checkpoint is now {moved})"
  latest = ckpt.latest_step()
  said += (f"; the latest checkpoint, step {latest}, is good"
           if latest is not None else "; no checkpoint is left")
  return TrainingError(said + "; lower the learning rate or clip gradients")


def train_inputs(config: ml_collections.ConfigDict,
                 program: program_lib.Program,
                 train: mnist.Split, start: int, total: int) -> Iterator[Any]:
  """The train step's second argument for steps start + 1 .. total.

  tfdata: the global batch, assembled from this process's rows. device: the
  dataset on the devices and the epoch's permutation; the step gathers the
  batch itself.
  """
  mesh = program.mesh
  if config.input_pipeline == "device":
    return input_pipeline.device_train_inputs(
        input_pipeline.to_devices(train, mesh),
        global_batch_size=config.batch_size,
        seed=config.seed, start_step=start, mesh=mesh)
  local = input_pipeline.train_dataset(
      train, global_batch_size=config.batch_size, seed=config.seed,
      start_step=start, num_steps=total - start,
      process_index=jax.process_index(),
      process_count=jax.process_count()).as_numpy_iterator()
  return (parallel.global_batch(batch, mesh) for batch in local)


def train_figures(log: progress.TrainLog, ckpt: checkpoint_lib.Checkpointer,
                  start: int, step: int) -> dict[str, Any]:
  """What this invocation's training amounted to, for results.json: taken
  just before the final save and saved in its meta, so a rerun after a kill
  during the end-of-run report reports the same figures. The checkpoint
  figures are those of the saves before the final one."""
  blocking, saves = ckpt.median_blocking_seconds()
  loss = log.last_train_loss
  return {"final_train_loss": loss if np.isfinite(loss) else None,
          **log.totals(), "steps_run": step - start,
          "resumed_from": start or None,
          "checkpoint_blocking_seconds": blocking,
          "checkpoints_saved": saves + 1}


def save_checkpoint(ckpt: checkpoint_lib.Checkpointer,
                    config: ml_collections.ConfigDict, step: int,
                    state: steps.TrainState,
                    eval_results: Mapping[str, Any] | None,
                    extra: Mapping[str, Any] | None = None) -> None:
  """Starts the save of `state`, with the run's config (and `extra`: the
  target clock, and at the final step the `train_figures`) in its meta
  and, when a best checkpoint is kept, the validation accuracy it is chosen
  by."""
  metrics = None
  if ckpt.keep_best and eval_results is not None:
    metrics = {checkpoint_lib.BEST_METRIC:
               eval_results[checkpoint_lib.BEST_METRIC]}
  meta = {"config": config.to_dict(), "devices": jax.device_count(),
          "processes": jax.process_count(), "step": step, **(extra or {})}
  ckpt.save(step, state, meta=meta, metrics=metrics)


@dataclasses.dataclass(frozen=True)
class LoopData:
  """What the loop reads: the training split, the evaluators (the test
  set's first, then the validation split's if held out), and what the data
  is (source.record's: saved with each checkpoint)."""
  train: mnist.Split
  evaluators: list[evaluator_lib.Evaluator]
  dataset: Mapping[str, Any]


class _Schedule:
  """Which of the periodic things happen after a step."""

  def __init__(self, config: ml_collections.ConfigDict, total: int,
               train_examples: int, keep_best: bool):
    self.total = total
    self.eval_every = eval_period(config, train_examples)
    self.checkpoint_every = config.checkpoint_every_steps
    self.keep_best = keep_best

  def evaluate(self, step: int) -> bool:
    return step == self.total or bool(
        self.eval_every and step % self.eval_every == 0)

  def checkpoint(self, step: int) -> bool:
    # With a best checkpoint to keep, every evaluation is saved.
    return (step == self.total or step % self.checkpoint_every == 0
            or (self.keep_best and self.evaluate(step)))


def open_clock(config: ml_collections.ConfigDict,
               resumed: Mapping[str, Any]) -> goodput.TargetClock:
  """The target clock, going on from the meta of the checkpoint resumed
  from (empty for a fresh start)."""
  return goodput.TargetClock(
      config.target_accuracy,
      goodput.target_split(config.validation_examples),
      resumed.get(goodput.CLOCK))


class _Timer:
  """The loop's seconds by phase: evaluation (less the evaluation steps'
  compilation, counted apart), checkpoint (the loop's thread blocked on
  saves), training (the rest of the loop)."""

  def __init__(self, evaluators: list[evaluator_lib.Evaluator]):
    self._evaluators = evaluators
    self._start = time.perf_counter()
    self._compiled = self._compile_seconds()
    self._phases = goodput.Goodput()
    self.timing = self._phases.phase  # timing("evaluation"): a context.

  def _compile_seconds(self) -> float:
    return sum(e.compile_seconds for e in self._evaluators)

  def compilation(self) -> float:
    return self._compile_seconds() - self._compiled

  def seconds(self) -> dict[str, float]:
    loop = time.perf_counter() - self._start
    compiling = self.compilation()
    evaluation = self._phases.seconds("evaluation")
    checkpoint = self._phases.seconds("checkpoint")
    return {"training": loop - evaluation - checkpoint,
            "evaluation": evaluation - compiling,
            "evaluation_compilation": compiling,
            "checkpoint_blocking": checkpoint}


def _progress(config: ml_collections.ConfigDict, workdir: Workdir,
              start: int, total: int
              ) -> tuple[progress.TrainLog, progress.ProfileWindow]:
  """The train metrics' log and the profile window of steps start+1..total."""
  log = progress.TrainLog(workdir.metrics, batch_size=config.batch_size,
                          log_every=config.log_every_steps,
                          total_steps=total, start_step=start)
  profile = progress.ProfileWindow(
      workdir.profile_dir, num_steps=config.profile_steps,
      start_step=start, total_steps=total)
  return log, profile


def train_loop(config: ml_collections.ConfigDict,
               program: program_lib.Program, state: steps.TrainState,
               data: LoopData, workdir: Workdir,
               signals: preemption.StopSignals,
               on_step: StepObserver | None) -> LoopEnd:
  """Steps after the state's own up to the total: train, log, evaluate,
  checkpoint (through the workdir's checkpointer and metrics), stop on a
  signal, or at the target accuracy with `stop_at_target`. A checkpoint is
  good once the next step's loss, fetched right after it, is finite.
  """
  start, total = int(jax.device_get(state.step)), program.total_steps
  ckpt, reporter = workdir.checkpointer, workdir.metrics
  plan = _Schedule(config, total, len(data.train.labels), ckpt.keep_best)
  inputs = train_inputs(config, program, data.train, start, total)
  log, profile = _progress(config, workdir, start, total)
  resumed = ckpt.read_meta(start) if start else {}
  clock, timer = open_clock(config, resumed), _Timer(data.evaluators)

  def save(step, eval_results, final):
    extra = {goodput.CLOCK: clock.meta(), DATASET: data.dataset}
    if final:
      extra[TRAIN_FIGURES] = train_figures(log, ckpt, start, step)
    workdir.check_lock()  # Never write over a run that took it over.
    with timer.timing("checkpoint"):
      save_checkpoint(ckpt, config, step, state, eval_results, extra)
    reporter.flush()
    return extra.get(TRAIN_FIGURES)

  eval_results, figures = None, None
  # A run that stopped at its target ends there, also on a rerun.
  end = start if config.stop_at_target and clock.reached_step else total
  verify_step = start + 1  # The loss of the state we start from.
  signals.loop_started(multiprocess=jax.process_count() > 1)
  clock.start()
  try:
    for step in range(start + 1, end + 1):
      profile.before_step(step)
      state, metrics = program.train_step(state, next(inputs))
      log.dispatched(step, metrics)
      profile.after_step(step, state)
      if on_step is not None:
        on_step(step, metrics)
      do_eval, do_ckpt = plan.evaluate(step), plan.checkpoint(step)
      if step == verify_step or do_eval or do_ckpt:
        log.flush(step)  # Never save a state whose own step diverged.
      if do_eval:
        with log.paused(), timer.timing("evaluation"):
          eval_results = evaluate(data.evaluators, state, step)
        clock.leave_out(timer.compilation())
        reporter.scalars(step, _eval_scalars(eval_results))
        if clock.evaluated(step, eval_results) and config.stop_at_target:
          end = step
      if do_ckpt or step == end:
        figures = save(step, eval_results if do_eval else None, step == end)
        verify_step = step + 1
      if step == end:
        break
      signum = signals.stop_requested(step, ckpt.reached_preemption)
      if signum is not None:
        if not do_ckpt:
          log.flush(step)
          save(step, None, final=False)
        ckpt.wait_until_finished()
        raise Preempted(step, signum)
    jax.block_until_ready(state)
    if eval_results is None:  # Nothing left to train: resumed at the end.
      end, figures = start, resumed.get(TRAIN_FIGURES)
      eval_results = evaluate(data.evaluators, state, start)
    with timer.timing("checkpoint"):
      ckpt.wait_until_finished()
  except Diverged as e:
    raise set_aside_diverged(workdir, e) from None
  finally:
    profile.close()
    reporter.flush()
  test = data.evaluators[0]
  return LoopEnd(state=state, step=end, eval_results=eval_results,
                 clock=clock, seconds=timer.seconds(), figures=figures,
                 test_logits=test.logits_of_last_call(),
                 test_figures=test.figures_of_last_call())
