"""Multi-process start-up order and the global batch (parallel.py).

`jax.distributed.initialize` and `jax.config.update` are replaced by
recorders, so the real backend is never touched.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mnist_resnet.core import parallel

ENV = (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES,
       parallel.ENV_PROCESS_ID)


@pytest.fixture
def recorded(monkeypatch):
  """Calls to jax.distributed.initialize and jax.config.update; a clean
  environment; not on Cloud TPU."""
  calls = {"initialize": [], "config": []}
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kw: calls["initialize"].append(kw))
  monkeypatch.setattr(jax.config, "update",
                      lambda *a: calls["config"].append(a))
  monkeypatch.setattr(parallel, "on_cloud_tpu", lambda: False)
  for name in ENV:
    monkeypatch.delenv(name, raising=False)
  return calls


def set_env(monkeypatch, address="env-host:1111", count="8", index="5"):
  monkeypatch.setenv(parallel.ENV_COORDINATOR, address)
  monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, count)
  monkeypatch.setenv(parallel.ENV_PROCESS_ID, index)


def initialized_with(calls) -> dict:
  assert len(calls["initialize"]) == 1, calls
  # CPU processes talk over gloo; set before initialize.
  assert calls["config"] == [("jax_cpu_collectives_implementation", "gloo")]
  return calls["initialize"][0]


def test_arguments_win_over_environment(recorded, monkeypatch):
  set_env(monkeypatch)
  assert parallel.initialize_distributed(
      enabled=True, coordinator_address="arg-host:2222", num_processes=4,
      process_id=3)
  assert initialized_with(recorded) == {
      "coordinator_address": "arg-host:2222", "num_processes": 4,
      "process_id": 3}


def test_process_zero_argument_is_set(recorded, monkeypatch):
  """0 is a valid process id: it beats the environment, not falls to it."""
  set_env(monkeypatch)
  parallel.initialize_distributed(enabled=True, process_id=0)
  assert initialized_with(recorded)["process_id"] == 0


def test_environment_used_when_arguments_unset(recorded, monkeypatch):
  set_env(monkeypatch)
  assert parallel.initialize_distributed(
      enabled=True, coordinator_address="", num_processes=-1, process_id=-1)
  assert initialized_with(recorded) == {
      "coordinator_address": "env-host:1111", "num_processes": 8,
      "process_id": 5}


def test_each_value_resolved_on_its_own(recorded, monkeypatch):
  """Argument for one key, environment for another, detection for the
  third."""
  monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "6")
  parallel.initialize_distributed(enabled=True,
                                  coordinator_address="arg-host:2222")
  assert initialized_with(recorded) == {
      "coordinator_address": "arg-host:2222", "num_processes": 6,
      "process_id": None}


def test_neither_leaves_values_to_jax_detection(recorded):
  assert parallel.initialize_distributed(enabled=True)
  assert initialized_with(recorded) == {
      "coordinator_address": None, "num_processes": None, "process_id": None}


def test_disabled_off_cloud_tpu_does_nothing(recorded, monkeypatch):
  set_env(monkeypatch)
  assert parallel.initialize_distributed(
      enabled=False, coordinator_address="arg-host:2222", num_processes=4,
      process_id=3) is False
  assert recorded == {"initialize": [], "config": []}


def test_cloud_tpu_initializes_even_when_not_enabled(recorded, monkeypatch):
  monkeypatch.setattr(parallel, "on_cloud_tpu", lambda: True)
  assert parallel.initialize_distributed(enabled=False)
  assert initialized_with(recorded) == {
      "coordinator_address": None, "num_processes": None, "process_id": None}


def test_global_shape_multiplies_rows_by_process_count(monkeypatch):
  assert parallel.global_shape((8, 28, 28)) == (8 * jax.process_count(), 28,
                                                28)
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  assert parallel.global_shape((8, 28, 28)) == (32, 28, 28)
  assert parallel.global_shape((3,)) == (12,)


def test_global_batch_on_one_process_is_the_input_sharded():
  assert jax.process_count() == 1
  mesh = parallel.create_mesh()
  assert mesh.axis_names == (parallel.DATA_AXIS,)
  assert mesh.devices.size == jax.device_count()
  rng = np.random.default_rng(0)
  n = 4 * jax.device_count()
  local = {"image": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
           "label": rng.integers(0, 10, n).astype(np.int32)}
  batch = parallel.global_batch(local, mesh)
  assert set(batch) == {"image", "label"}
  for name, value in local.items():
    array = batch[name]
    assert array.shape == value.shape and array.dtype == value.dtype
    assert array.sharding == parallel.batch_sharding(mesh)
    assert array.sharding.spec == jax.sharding.PartitionSpec(
        parallel.DATA_AXIS)
    np.testing.assert_array_equal(np.asarray(array), value)
