"""Evaluation on the test (or validation) split: every example counted once.

An `Evaluator` is built once per run (jitted step, test pipeline) and called
with a train state whenever the loop evaluates. Batches are padded to whole
global batches and the padding rows dropped before anything is counted, so
no example is dropped or counted twice, whatever the batch size and device
count. With the device pipeline
the split sits on the devices and one jitted call loops over its batches.
"""

from __future__ import annotations

import time
from typing import Any
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mnist_resnet.core import parallel
from mnist_resnet.data import input_pipeline
from mnist_resnet.data import mnist
from mnist_resnet.model import preprocess
from mnist_resnet.model import resnet
from mnist_resnet.training import classification
from mnist_resnet.training import memory
from mnist_resnet.training import steps


def make_eval_step(model: resnet.ResNet,
                   model_input: preprocess.ModelInput) -> Callable:
  """(params, batch_stats, batch) -> the batch's float32 logits."""

  def eval_step(params, batch_stats, batch):
    x = model_input.for_eval(batch["image"])
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x,
                         train=False)
    return logits.astype(jnp.float32)

  return eval_step


def make_eval_all(model: resnet.ResNet, model_input: preprocess.ModelInput,
                  *, num_examples: int, global_batch_size: int,
                  mesh: jax.sharding.Mesh) -> Callable:
  """(params, batch_stats, split on device) -> logits of every batch of the
  split, in the order `input_pipeline.test_dataset` gives them: [batches *
  G, 10], padding rows included."""
  eval_step = make_eval_step(model, model_input)
  num_batches = -(-num_examples // global_batch_size)

  def eval_all(params, batch_stats, on_device):
    def body(b, all_logits):
      batch = input_pipeline.gather_test_batch(
          on_device, b, global_batch_size=global_batch_size, mesh=mesh)
      return jax.lax.dynamic_update_slice_in_dim(
          all_logits, eval_step(params, batch_stats, batch),
          b * global_batch_size, axis=0)
    all_logits = jnp.zeros((num_batches * global_batch_size,
                            mnist.NUM_CLASSES), jnp.float32)
    return jax.lax.fori_loop(0, num_batches, body, all_logits)

  return eval_all


class Evaluator:
  """Loss, accuracy and per-class accuracy of a state on one split; the
  result's keys start with `name` ("test_accuracy", "validation_loss").
  `pipeline` is the run's input pipeline ("tfdata" or "device").

  Every example's logits come back to the host, where
  `classification.metrics_from_logits` computes every figure once
  (`figures_of_last_call`); an end-of-run report reuses them and the logits
  (`logits_of_last_call`), with no second pass over the split.
  """

  def __init__(self, model: resnet.ResNet, model_input: preprocess.ModelInput,
               split: mnist.Split, *, batch_size: int,
               mesh: jax.sharding.Mesh, name: str = "test",
               pipeline: str = "tfdata"):
    self.name = name
    self._num_examples = len(split.labels)
    self._labels = np.asarray(split.labels, np.int64)
    rep = parallel.replicated(mesh)
    # Whole rows per device: the padding absorbs the rounding up.
    devices = mesh.devices.size
    self.batch_size = -(-batch_size // devices) * devices
    self._on_device = None
    # Logits come back replicated (an all-gather of [G, 10] per batch), so
    # every process can read all of them.
    if pipeline == "device":
      self._on_device = input_pipeline.to_devices(split, mesh)
      self._eval_all = jax.jit(
          make_eval_all(model, model_input, num_examples=self._num_examples,
                        global_batch_size=self.batch_size, mesh=mesh),
          in_shardings=(rep, rep, rep), out_shardings=rep)
    else:
      self._step = jax.jit(
          make_eval_step(model, model_input),
          in_shardings=(rep, rep, parallel.batch_sharding(mesh)),
          out_shardings=rep)
      self._batches = input_pipeline.test_dataset(
          split, global_batch_size=self.batch_size,
          process_index=jax.process_index(),
          process_count=jax.process_count())
    self._mesh = mesh
    self._compiled = False  # The first call compiles ahead of time.
    # Seconds that compilation took: time to target leaves them out.
    self.compile_seconds = 0.0
    self._last_logits: np.ndarray | None = None
    self._last_figures: dict[str, Any] | None = None

  def _checked(self, jitted: Any, *args: Any) -> Any:
    """`jitted` compiled for `args`, once it fits in memory; the state's
    arrays are resident already, so only what the step adds counts."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    self.compile_seconds += time.perf_counter() - start
    memory.check_fits(compiled, what=f"the {self.name} evaluation step",
                      key="eval_batch_size", batch_size=self.batch_size,
                      resident=True)
    return compiled

  def _logits(self, state: steps.TrainState) -> list[jax.Array]:
    params, batch_stats = steps.eval_variables(state)
    if self._on_device is not None:
      if not self._compiled:
        self._eval_all = self._checked(self._eval_all, params, batch_stats,
                                       self._on_device)
        self._compiled = True
      return [self._eval_all(params, batch_stats, self._on_device)]
    logits = []
    for local in self._batches.as_numpy_iterator():
      batch = parallel.global_batch(local, self._mesh)
      if not self._compiled:
        self._step = self._checked(self._step, params, batch_stats, batch)
        self._compiled = True
      logits.append(self._step(params, batch_stats, batch))
    return logits

  def logits_of_last_call(self) -> np.ndarray:
    """float32 [N, 10]: the logits of every example of the split, in split
    order, from the last evaluation."""
    if self._last_logits is None:
      raise RuntimeError("logits_of_last_call before any evaluation")
    return self._last_logits

  def figures_of_last_call(self) -> dict[str, Any]:
    """`classification.metrics_from_logits` of the last evaluation."""
    if self._last_figures is None:
      raise RuntimeError("figures_of_last_call before any evaluation")
    return self._last_figures

  def __call__(self, state: steps.TrainState) -> dict[str, Any]:
    # Padding rows come last: the first N rows are the split's, in order.
    logits = np.concatenate(jax.device_get(self._logits(state)))
    self._last_logits = logits[:self._num_examples]
    figures = classification.metrics_from_logits(self._last_logits,
                                                 self._labels)
    self._last_figures = figures
    if self.name != "test":
      return {f"{self.name}_accuracy": figures["accuracy"],
              f"{self.name}_loss": figures["loss"]}
    return {
        "test_accuracy": figures["accuracy"],
        "test_loss": figures["loss"],
        "eval_examples": figures["eval_examples"],
        "per_class_accuracy": figures["per_class_accuracy"],
    }
