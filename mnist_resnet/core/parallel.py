"""Data parallelism: one mesh over every device of every process.

The batch is sharded along the mesh's single 'data' axis; parameters, batch
statistics and optimizer state are replicated. Under `jax.jit` a reduction over
the batch (BatchNorm's mean, the loss) is already a reduction over the global
batch, so the model needs no axis names and the same code serves one CPU, a
GPU host or a TPU pod.
"""

from __future__ import annotations

from typing import Any
from typing import Mapping

from absl import logging
import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from mnist_resnet.core.errors import ConfigError

DATA_AXIS = "data"


def create_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over all devices (of all processes), axis 'data'.

  Auto axis types: sharding is propagated by the compiler from the shardings
  given to `jax.jit`, which keeps the model code free of sharding annotations.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray],
                 mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into one global array.

  Every process passes the rows it read from its own input shard; the global
  batch is their concatenation in process order, whatever the process count.
  """
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(
      sharding, value, global_shape(value.shape))
          for name, value in local.items()}


def global_shape(local_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the global batch whose per-process rows have `local_shape`."""
  return (local_shape[0] * jax.process_count(),) + tuple(local_shape[1:])


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a host pytree on every device (same value in every process)."""
  return jax.device_put(tree, replicated(mesh))


# --------------------------------------------------------------------------
# Start-up: before anything touches a device.

# XLA:GPU's switch for reproducible runs: ops without a deterministic
# implementation (atomics-based scatter and reductions) are replaced, and
# kernels are no longer chosen by timing them (autotuning picks by the
# clock, so two runs can pick kernels that round differently). CPU and TPU
# ignore it.
DETERMINISTIC_XLA_FLAGS = ("--xla_gpu_deterministic_ops=true",)


def request_deterministic_ops(enabled: bool) -> None:
  """Adds the deterministic GPU flags to XLA_FLAGS when `enabled`. XLA reads
  XLA_FLAGS once, when the first backend starts: call before that."""
  if not enabled:
    return
  import os  # pylint: disable=g-import-not-at-top
  flags = os.environ.get("XLA_FLAGS", "").split()
  missing = [f for f in DETERMINISTIC_XLA_FLAGS if f not in flags]
  os.environ["XLA_FLAGS"] = " ".join(flags + missing)


ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def on_cloud_tpu() -> bool:
  """True on a Cloud TPU VM (libtpu installed and TPU chips attached).

  Looked up without starting a JAX backend, which must not happen before
  `jax.distributed.initialize`.
  """
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


# What JAX's cluster detection needs, said when it finds nothing.
_DETECTION_NEEDS = {
    "slurm": "SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID "
             "and SLURM_LOCALID, as srun sets them",
    "ompi": "OMPI_MCA_orte_hnp_uri, as Open MPI 4's mpirun sets it (Open MPI "
            "5 does not: use mpi4py)",
    "mpi4py": "the mpi4py package (and an MPI library)",
}


def _cluster_types() -> list[Any] | None:
  """JAX's cluster detection classes (it lists them nowhere public); None
  where the installed JAX keeps them elsewhere."""
  # pylint: disable=g-import-not-at-top,protected-access
  try:
    from jax._src import clusters
    return list(clusters.ClusterEnv._cluster_types)
  except (ImportError, AttributeError):
    return None


def cluster_detection_methods() -> tuple[str, ...] | None:
  """The names jax.distributed.initialize's cluster_detection_method takes,
  read from the installed JAX; None if they cannot be read there."""
  types = _cluster_types()
  if types is None:
    return None
  return tuple(sorted({t.name for t in types if t.name}))


def parse_start_up_keys(cluster_detection: str, local_device_ids: str
                        ) -> tuple[str | None, list[int] | None]:
  """The two keys as jax.distributed.initialize takes them (empty: None).

  Raises ConfigError for a name JAX does not know or an id list that is not
  distinct non-negative integers separated by commas: before any start-up.
  """
  method = cluster_detection or None
  names = cluster_detection_methods()
  if method is not None and names is not None and method not in names:
    raise ConfigError(
        f"config.cluster_detection={cluster_detection!r}: not one of JAX's "
        f"cluster detection methods ({', '.join(names)}); empty tries each")
  if not local_device_ids.strip():
    return method, None
  parts = [p.strip() for p in local_device_ids.split(",")]
  if not all(p.isdigit() and p.isascii() for p in parts):
    raise ConfigError(
        f"config.local_device_ids={local_device_ids!r}: must be "
        "non-negative integers separated by commas, e.g. '0,1,2,3'")
  ids = [int(p) for p in parts]
  if len(set(ids)) != len(ids):
    raise ConfigError(f"config.local_device_ids={local_device_ids!r}: "
                      "lists a device twice")
  return method, ids


def _check_detection_present(method: str) -> None:
  """Raises ConfigError when JAX's `method` finds no environment: JAX would
  log it and fail later on a missing coordinator address."""
  for env in _cluster_types() or []:
    if env.name == method and not env.is_env_present():
      needs = _DETECTION_NEEDS.get(method, "its environment")
      raise ConfigError(f"config.cluster_detection={method!r}: JAX finds no "
                        f"{method} environment in this process (needs "
                        f"{needs})")


def initialize_distributed(*, enabled: bool, coordinator_address: str = "",
                           num_processes: int = -1, process_id: int = -1,
                           cluster_detection: str = "",
                           local_device_ids: str = "") -> bool:
  """Joins the processes of a multi-host run; returns whether it did.

  Runs when `enabled`, and always on Cloud TPU (where JAX finds every value
  itself). Each value comes from its argument when set, else from the
  environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID),
  else from JAX's cluster detection (Cloud TPU, SLURM, Open MPI 4,
  Kubernetes; `cluster_detection` names one, e.g. mpi4py, which JAX tries
  only when named). `local_device_ids` ("0,1,...") are this process's
  accelerators; empty leaves them to JAX. Must run before anything touches
  a JAX device.
  """
  method, device_ids = parse_start_up_keys(cluster_detection,
                                           local_device_ids)
  if not (enabled or on_cloud_tpu()):
    return False
  import os  # pylint: disable=g-import-not-at-top
  address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  count = num_processes if num_processes >= 0 else int(
      os.environ.get(ENV_NUM_PROCESSES, -1))
  index = process_id if process_id >= 0 else int(
      os.environ.get(ENV_PROCESS_ID, -1))
  if method is not None:
    _check_detection_present(method)
  # Which values JAX is left to detect: the first thing to know when a
  # cluster's processes do not find each other.
  detected = "from JAX's cluster detection" + (f" ({method})" if method
                                                else "")
  logging.info(
      "jax.distributed.initialize: coordinator address %s, process count "
      "%s, process id %s", address or detected,
      count if count > 0 else detected, index if index >= 0 else detected)
  # Several processes on CPU devices talk through gloo (also how the
  # multi-process code is tested on one machine); no effect on GPU/TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=address,
      num_processes=count if count > 0 else None,
      process_id=index if index >= 0 else None,
      local_device_ids=device_ids, cluster_detection_method=method)
  return True
