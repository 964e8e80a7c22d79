"""Data parallelism: one mesh over every device of every process.

The batch is sharded along the mesh's single 'data' axis; parameters, batch
statistics and optimizer state are replicated. Under `jax.jit` a reduction over
the batch (BatchNorm's mean, the loss) is already a reduction over the global
batch, so the model needs no axis names and the same code serves one CPU, a
GPU host or a TPU pod.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

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
  out = {}
  for name, value in local.items():
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[name] = jax.make_array_from_process_local_data(
        sharding, value, global_shape)
  return out


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a host pytree on every device (same value in every process)."""
  return jax.device_put(tree, replicated(mesh))
