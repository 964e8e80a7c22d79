"""Evaluation: every example once, the EMA when kept, any batch size."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT
from configs import smoke
from mnist_resnet import evaluator
from mnist_resnet import mnist
from mnist_resnet import parallel
from mnist_resnet import train


def _evaluate(config, state, labels):
  program = train.build_program(config, 1000)
  split = mnist.Split(np.zeros((len(labels), 28, 28), np.uint8),
                      np.asarray(labels, np.int32))
  evaluate = evaluator.Evaluator(program.model, program.model_input, split,
                                 batch_size=config.eval_batch_size,
                                 mesh=program.mesh)
  return evaluate(parallel.replicate(state, program.mesh)), evaluate


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
  state = jax.device_get(train.build_program(config, 1000).initial_state())
  ema = {"params": _always_three(state, lambda s: s.ema),
         "batch_stats": state.ema["batch_stats"]}
  got, _ = _evaluate(config, state.replace(ema=ema), LABELS)
  assert got["eval_examples"] == 11
  assert got["test_accuracy"] == pytest.approx(6 / 11)
  assert got["per_class_accuracy"][3] == 1.0
  assert got["per_class_accuracy"][1] == 0.0


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
state = jax.device_get(t.train.build_program(config, 1000).initial_state())
params = t._always_three(state, lambda s: {{"params": s.params}})
got, evaluate = t._evaluate(config, state.replace(params=params), t.LABELS)
assert evaluate.batch_size == 8, evaluate.batch_size
assert got["eval_examples"] == 11, got
assert abs(got["test_accuracy"] - 6 / 11) < 1e-6, got
print("ok")
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
