"""Evaluation on the test (or validation) split: every example counted once.

An `Evaluator` is built once per run (jitted step, test pipeline) and called
with a train state whenever the loop evaluates. Batches are padded to whole
global batches and the padding masked, so no example is dropped or counted
twice, whatever the batch size and device count. With the device pipeline
the split sits on the devices and one jitted call loops over its batches.
"""

from __future__ import annotations

from typing import Any
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnist_resnet.core import parallel
from mnist_resnet.data import input_pipeline
from mnist_resnet.data import mnist
from mnist_resnet.model import preprocess
from mnist_resnet.model import resnet
from mnist_resnet.training import steps


def _zero_sums() -> dict[str, jax.Array]:
  k = mnist.NUM_CLASSES
  return {"loss_sum": jnp.zeros(()), "correct": jnp.zeros(()),
          "count": jnp.zeros(()), "class_correct": jnp.zeros((k,)),
          "class_count": jnp.zeros((k,))}


def make_eval_step(model: resnet.ResNet,
                   model_input: preprocess.ModelInput) -> Callable:
  """(sums, params, batch_stats, batch) -> (sums, the batch's logits), over
  masked test batches."""

  def eval_step(sums, params, batch_stats, batch):
    x = model_input.for_eval(batch["image"])
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x,
                         train=False)
    labels = batch["label"]
    mask = batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
    onehot = jax.nn.one_hot(labels, mnist.NUM_CLASSES) * mask[:, None]
    return {
        "loss_sum": sums["loss_sum"] + jnp.sum(loss * mask),
        "correct": sums["correct"] + jnp.sum(correct),
        "count": sums["count"] + jnp.sum(mask),
        "class_correct": sums["class_correct"] + correct @ onehot,
        "class_count": sums["class_count"] + jnp.sum(onehot, 0),
    }, logits

  return eval_step


def make_eval_all(model: resnet.ResNet, model_input: preprocess.ModelInput,
                  *, num_examples: int, global_batch_size: int,
                  mesh: jax.sharding.Mesh) -> Callable:
  """(sums, params, batch_stats, split on device) -> (sums, logits) over
  every batch of the split, as `eval_step` over
  `input_pipeline.test_dataset` computes
  them; logits [batches * G, 10], padding rows included."""
  eval_step = make_eval_step(model, model_input)
  num_batches = -(-num_examples // global_batch_size)

  def eval_all(sums, params, batch_stats, on_device):
    def body(b, carry):
      sums, all_logits = carry
      batch = input_pipeline.gather_test_batch(on_device, b,
                                     global_batch_size=global_batch_size,
                                     mesh=mesh)
      sums, logits = eval_step(sums, params, batch_stats, batch)
      all_logits = jax.lax.dynamic_update_slice_in_dim(
          all_logits, logits, b * global_batch_size, axis=0)
      return sums, all_logits
    all_logits = jnp.zeros((num_batches * global_batch_size,
                            mnist.NUM_CLASSES), jnp.float32)
    return jax.lax.fori_loop(0, num_batches, body, (sums, all_logits))

  return eval_all


class Evaluator:
  """Loss, accuracy and per-class accuracy of a state on one split; the
  result's keys start with `name` ("test_accuracy", "validation_loss").
  `pipeline` is the run's input pipeline ("tfdata" or "device").

  The same pass also yields every example's logits (`logits_of_last_call`),
  so an end-of-run report needs no second pass over the split.
  """

  def __init__(self, model: resnet.ResNet, model_input: preprocess.ModelInput,
               split: mnist.Split, *, batch_size: int,
               mesh: jax.sharding.Mesh, name: str = "test",
               pipeline: str = "tfdata"):
    self.name = name
    self._num_examples = len(split.labels)
    rep = parallel.replicated(mesh)
    # Whole rows per device: the padding absorbs the rounding up.
    devices = mesh.devices.size
    self.batch_size = -(-batch_size // devices) * devices
    self._zeros = jax.jit(_zero_sums, out_shardings=rep)
    self._on_device = None
    # Logits come back replicated (an all-gather of [G, 10] per batch), so
    # every process can read all of them.
    if pipeline == "device":
      self._on_device = input_pipeline.to_devices(split, mesh)
      self._eval_all = jax.jit(
          make_eval_all(model, model_input, num_examples=self._num_examples,
                        global_batch_size=self.batch_size, mesh=mesh),
          in_shardings=(rep, rep, rep, rep), out_shardings=(rep, rep),
          donate_argnums=(0,))
    else:
      self._step = jax.jit(
          make_eval_step(model, model_input),
          in_shardings=(rep, rep, rep, parallel.batch_sharding(mesh)),
          out_shardings=(rep, rep), donate_argnums=(0,))
      self._batches = input_pipeline.test_dataset(
          split, global_batch_size=self.batch_size,
          process_index=jax.process_index(),
          process_count=jax.process_count())
    self._mesh = mesh
    self._logits: list[jax.Array] = []

  def _sums(self, state: steps.TrainState) -> dict[str, np.ndarray]:
    sums = self._zeros()
    params, batch_stats = steps.eval_variables(state)
    if self._on_device is not None:
      sums, logits = self._eval_all(sums, params, batch_stats,
                                    self._on_device)
      self._logits = [logits]
      return jax.device_get(sums)
    self._logits = []
    for local in self._batches.as_numpy_iterator():
      sums, logits = self._step(sums, params, batch_stats,
                                parallel.global_batch(local, self._mesh))
      self._logits.append(logits)
    return jax.device_get(sums)

  def logits_of_last_call(self) -> np.ndarray:
    """float32 [N, 10]: the logits of every example of the split, in split
    order, from the last evaluation."""
    if not self._logits:
      raise RuntimeError("logits_of_last_call before any evaluation")
    logits = np.concatenate(jax.device_get(self._logits))
    return logits[:self._num_examples]

  def __call__(self, state: steps.TrainState) -> dict[str, Any]:
    sums = self._sums(state)
    count = int(sums["count"])
    per_class = sums["class_correct"] / np.maximum(sums["class_count"], 1)
    if self.name != "test":
      return {f"{self.name}_accuracy": float(sums["correct"]) / count,
              f"{self.name}_loss": float(sums["loss_sum"]) / count}
    return {
        "test_accuracy": float(sums["correct"]) / count,
        "test_loss": float(sums["loss_sum"]) / count,
        "eval_examples": count,
        "per_class_accuracy": [round(float(a), 6) for a in per_class],
    }
