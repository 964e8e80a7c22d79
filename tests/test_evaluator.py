"""Evaluation: every example once, the EMA when kept, any batch size."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import smoke
from conftest import REPO_ROOT
from mnist_resnet.core import parallel
from mnist_resnet.data import mnist
from mnist_resnet.training import evaluator
from mnist_resnet.training import memory
from mnist_resnet.training import program as program_lib


def _evaluate(config, state, labels, images=None, pipeline="tfdata"):
  program = program_lib.build_program(config, 1000)
  if images is None:
    images = np.zeros((len(labels), 28, 28), np.uint8)
  split = mnist.Split(images, np.asarray(labels, np.int32))
  evaluate = evaluator.Evaluator(program.model, program.model_input, split,
                                 batch_size=config.eval_batch_size,
                                 mesh=program.mesh, pipeline=pipeline)
  return evaluate(parallel.replicate(state, program.mesh)), evaluate


def _random_head(state):
  """`state` with a random output layer (at init it is zero: every logit
  would be 0 and any row order would pass)."""
  params = jax.tree.map(np.array, state.params)
  kernel = params["head"]["logits"]["kernel"]
  kernel[:] = np.random.default_rng(0).normal(size=kernel.shape)
  return state.replace(params=params)


def _reference_logits(config, state, images):
  """The model applied to all images at once, outside the evaluator."""
  program = program_lib.build_program(config, 1000)
  x = program.model_input.for_eval(images)
  return np.asarray(jax.jit(lambda v, x: program.model.apply(
      v, x, train=False))({"params": state.params,
                           "batch_stats": state.batch_stats}, x))


def _cross_entropy(logits, labels):
  """Each row's softmax cross-entropy, in float64 numpy."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
  return log_z - logits[np.arange(len(labels)), labels]


def check_logits_of_last_call(config, pipeline):
  """The evaluation's own logits are the model's, row for row, in split
  order, padding cut off (11 examples, batches that do not divide them);
  its loss is their mean cross-entropy, the padding rows left out."""
  images = np.random.default_rng(1).integers(0, 256, (11, 28, 28), np.uint8)
  state = _random_head(jax.device_get(
      program_lib.build_program(config, 1000).initial_state()))
  got, evaluate = _evaluate(config, state, LABELS, images, pipeline)
  logits = evaluate.logits_of_last_call()
  assert logits.shape == (11, 10) and logits.dtype == np.float32
  ref = _reference_logits(config, state, images)
  # float32 through the network at another batch size: XLA may pick other
  # convolution kernels (2e-5 seen); a wrong or shifted row is off by O(1).
  np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
  accuracy = np.mean(np.argmax(logits, -1) == np.asarray(LABELS))
  assert got["test_accuracy"] == pytest.approx(accuracy)
  # The loss is the mean over the 11 examples alone: the padding rows (zero
  # images, label 0) would move it, as the check below makes sure.
  labels = np.asarray(LABELS)
  loss = _cross_entropy(ref, labels)
  assert got["test_loss"] == pytest.approx(loss.mean(), rel=1e-4)
  rows = -(-len(labels) // evaluate.batch_size) * evaluate.batch_size
  padding = _cross_entropy(_reference_logits(
      config, state, np.zeros((1, 28, 28), np.uint8)), np.zeros(1, int))
  padded = np.concatenate([loss, np.repeat(padding, rows - len(labels))])
  assert rows > len(labels)
  assert abs(padded.mean() - loss.mean()) > 1e-3 * abs(loss.mean())


def _always_three(state, column):
  """`state` with the head of `column` ("params" or the EMA) answering 3."""
  params = jax.tree.map(np.array, column(state)["params"])
  params["head"]["logits"]["kernel"][:] = 0.0
  params["head"]["logits"]["bias"][:] = np.eye(10, dtype=np.float32)[3] * 10
  return params


LABELS = [3, 3, 3, 1, 2, 3, 7, 0, 3, 5, 3]


def test_evaluation_uses_the_ema_when_kept():
  """A state whose EMA head always answers 3 scores the share of 3s."""
  config = smoke.get_config()
  config.ema_decay = 0.99
  config.eval_batch_size = 8
  state = jax.device_get(
      program_lib.build_program(config, 1000).initial_state())
  ema = {"params": _always_three(state, lambda s: s.ema),
         "batch_stats": state.ema["batch_stats"]}
  got, _ = _evaluate(config, state.replace(ema=ema), LABELS)
  assert got["eval_examples"] == 11
  assert got["test_accuracy"] == pytest.approx(6 / 11)
  assert got["per_class_accuracy"][3] == 1.0
  assert got["per_class_accuracy"][1] == 0.0


@pytest.mark.parametrize("pipeline", ["tfdata", "device"])
def test_logits_of_last_call_are_the_models(pipeline):
  config = smoke.get_config()
  config.eval_batch_size = 4
  check_logits_of_last_call(config, pipeline)


def test_an_eval_batch_that_does_not_fit_is_one_line(monkeypatch):
  """The first evaluation asks the compiler what its step adds to the
  state in memory, and names config.eval_batch_size when that is more than
  the devices have free; with either pipeline."""
  config = smoke.get_config()
  config.eval_batch_size = 4
  state = jax.device_get(
      program_lib.build_program(config, 1000).initial_state())
  monkeypatch.setattr(memory, "available_bytes", lambda: 1)
  for pipeline in ("tfdata", "device"):
    with pytest.raises(memory.OutOfMemory,
                       match=r"^config.eval_batch_size=4 \(4 per device\) "
                             r"does not fit in memory: the test evaluation "
                             r"step needs \d+ bytes .* free; not even one "
                             r"example "):
      _evaluate(config, state, LABELS, pipeline=pipeline)


def test_batch_size_need_not_divide_by_the_devices():
  """On 8 devices an eval batch of 5 is padded to 8 and still counts each
  of the 11 examples once."""
  code = f"""
import sys
sys.path[:0] = [{str(REPO_ROOT)!r}, {str(REPO_ROOT / 'tests')!r}]
import jax, numpy as np
from configs import smoke
import test_evaluator as t
assert jax.device_count() == 8
config = smoke.get_config()
config.batch_size = 8
config.eval_batch_size = 5
state = jax.device_get(
    t.program_lib.build_program(config, 1000).initial_state())
params = t._always_three(state, lambda s: {{"params": s.params}})
got, evaluate = t._evaluate(config, state.replace(params=params), t.LABELS)
assert evaluate.batch_size == 8, evaluate.batch_size
assert got["eval_examples"] == 11, got
assert abs(got["test_accuracy"] - 6 / 11) < 1e-6, got
# The device pipeline pads on the devices; the tf.data pipeline's padding
# is checked on one device (test_logits_of_last_call_are_the_models).
t.check_logits_of_last_call(config, "device")
print("ok")
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
