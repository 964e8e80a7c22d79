"""The two input pipelines of uint8 MNIST batches: tf.data and on-device.

`config.input_pipeline`: tfdata, tf.data on the host, each process shipping
its rows of every global batch to its devices; device, the whole dataset on
every device and each batch gathered inside the jitted step. Both follow
`order` exactly, so they give the same run; evaluation visits every example
once, padded and masked. TensorFlow is imported, through `tf_host`, only
when a tf.data pipeline is built. docs/training.md#input-pipelines.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Mapping
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mnist_resnet.core import parallel
from mnist_resnet.core import tf_host
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.data import mnist
from mnist_resnet.data import order

PIPELINES = ("tfdata", "device")

if TYPE_CHECKING:
  import tensorflow as tf

# Images gathered per tf.data element before it is split into steps: enough
# to amortise per-element overhead at small batch sizes (16 steps of 128),
# small enough that the first batch comes quickly and buffers stay small.
_CHUNK_IMAGES = 2048


def _no_tensorflow(why: object) -> ConfigError:
  return ConfigError(
      f"config.input_pipeline='tfdata' needs TensorFlow, which cannot be "
      f"imported here ({why}); install tensorflow-cpu, or use "
      "--config.input_pipeline=device")


def check_available(pipeline: str) -> None:
  """Raises ConfigError when `pipeline` cannot run here (tf.data without
  TensorFlow); looks, does not import."""
  if pipeline != "tfdata":
    return
  try:
    found = importlib.util.find_spec("tensorflow") is not None
  except ImportError as e:
    raise _no_tensorflow(e) from None
  if not found:
    raise _no_tensorflow("No module named 'tensorflow'")


def _tensorflow():
  try:
    return tf_host.import_tensorflow()
  except ImportError as e:
    raise _no_tensorflow(e) from None


def train_dataset(split: mnist.Split, *, global_batch_size: int, seed: int,
                  start_step: int = 0, num_steps: Optional[int] = None,
                  process_index: int = 0, process_count: int = 1
                  ) -> "tf.data.Dataset":
  """Shuffled training batches of this process, from global step start_step.

  Yields {"image": uint8 [B, 28, 28], "label": int32 [B]} with
  B = global_batch_size // process_count: rows [p*B, (p+1)*B) of the global
  batch `order.global_batch_indices(N, global_batch_size, seed, step)` for
  step = start_step, start_step + 1, ... (num_steps of them; None: forever).
  """
  tf = _tensorflow()
  num_examples = len(split.labels)
  local = order._local_batch_size(global_batch_size, process_index,
                                  process_count)
  spe = order.steps_per_epoch(num_examples, global_batch_size)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if num_steps is not None and num_steps < 0:
    raise ValueError(f"num_steps must be >= 0 or None, got {num_steps}")
  first_epoch, first_offset = divmod(start_step, spe)
  if num_steps is None:
    end_epoch = 2**62  # Effectively forever.
  else:
    end_epoch = -(-(start_step + num_steps) // spe)
  images = tf.constant(split.images)
  labels = tf.constant(split.labels.astype(np.int32, copy=False))

  def epoch_rows(epoch):
    """This process's example indices for each remaining step of `epoch`."""
    perm = order._epoch_permutation_tf(tf, num_examples, seed, epoch)
    rows = tf.reshape(perm[:spe * global_batch_size], [spe, global_batch_size])
    rows = rows[:, process_index * local:(process_index + 1) * local]
    skip = tf.where(epoch == first_epoch, first_offset, 0)
    return tf.cast(rows[skip:], tf.int32)

  def gather(rows):
    return {"image": tf.gather(images, rows), "label": tf.gather(labels, rows)}

  ds = tf.data.Dataset.range(first_epoch, end_epoch)
  ds = ds.map(epoch_rows).unbatch()
  if num_steps is not None:
    ds = ds.take(num_steps)
  ds = ds.batch(max(1, _CHUNK_IMAGES // local))
  ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.unbatch()
  return ds.prefetch(tf.data.AUTOTUNE)


def test_dataset(split: mnist.Split, *, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> "tf.data.Dataset":
  """Every example once, in file order, padded to whole batches and masked.

  ceil(N / G) global batches; global batch b covers examples [b*G, (b+1)*G)
  and this process gets rows [p*B, (p+1)*B) of it. Rows past N are zeros
  with mask False, so every process yields the same number of batches (a
  collective step never waits on a process that ran out) and metrics that
  weight by the mask count each test example exactly once.
  """
  tf = _tensorflow()
  num_examples = len(split.labels)
  local = order._local_batch_size(global_batch_size, process_index,
                                  process_count)
  num_batches = -(-num_examples // global_batch_size)
  images = tf.constant(split.images)
  labels = tf.constant(split.labels.astype(np.int32, copy=False))

  def batch(b):
    first = tf.cast(b, tf.int32) * global_batch_size + process_index * local
    index = first + tf.range(local, dtype=tf.int32)
    mask = index < num_examples
    safe = tf.minimum(index, num_examples - 1)
    image = tf.gather(images, safe)
    image = tf.where(mask[:, None, None], image, tf.zeros_like(image))
    label = tf.where(mask, tf.gather(labels, safe), 0)
    return {"image": image, "label": label, "mask": mask}

  ds = tf.data.Dataset.range(num_batches)
  ds = ds.map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)


# pytest would otherwise collect this public function as a test.
test_dataset.__test__ = False


# --------------------------------------------------------------------------
# The device-resident pipeline.


def to_devices(split: mnist.Split, mesh: jax.sharding.Mesh
               ) -> dict[str, jax.Array]:
  """The split on every device: uint8 images [N, 28, 28], int32 labels [N].

  Every process holds the whole split, so the replicated arrays are built
  from local data alone; this is the only host-to-device copy of the run.
  """
  sharding = parallel.replicated(mesh)
  arrays = {"image": np.ascontiguousarray(split.images, np.uint8),
            "label": np.ascontiguousarray(split.labels, np.int32)}
  return {k: jax.make_array_from_callback(v.shape, sharding,
                                          lambda index, v=v: v[index])
          for k, v in arrays.items()}


def device_train_inputs(on_device: Mapping[str, jax.Array], *,
                        global_batch_size: int, seed: int, start_step: int,
                        mesh: jax.sharding.Mesh) -> Iterator[dict[str, Any]]:
  """What the device pipeline's train step takes at steps start_step,
  start_step + 1, ...: the dataset and the permutation of the step's epoch.

  The permutation is computed on the devices (order's jax.numpy twin), once
  per epoch; between epochs nothing leaves or enters the devices.
  """
  num_examples = on_device["label"].shape[0]
  spe = order.steps_per_epoch(num_examples, global_batch_size)
  permutation = jax.jit(
      functools.partial(order.epoch_permutation_jax, num_examples, seed),
      out_shardings=parallel.replicated(mesh))
  step, epoch, perm = start_step, None, None
  while True:
    if step // spe != epoch:
      epoch = step // spe
      perm = permutation(np.uint32(epoch))
    yield {"data": on_device, "perm": perm}
    step += 1


def gather_train_batch(inputs: Mapping[str, Any], step: jax.Array, *,
                       global_batch_size: int, mesh: jax.sharding.Mesh
                       ) -> dict[str, jax.Array]:
  """Inside jit: the global batch of `step` from `device_train_inputs`,
  sharded over the 'data' axis (each device gathers its own rows)."""
  perm = inputs["perm"]
  spe = perm.shape[0] // global_batch_size
  first = (step % spe) * global_batch_size
  rows = jax.lax.dynamic_slice_in_dim(perm, first, global_batch_size)
  rows = jax.lax.with_sharding_constraint(rows, parallel.batch_sharding(mesh))
  return {k: v[rows] for k, v in inputs["data"].items()}


def with_device_batches(train_step: Callable, *, global_batch_size: int,
                        mesh: jax.sharding.Mesh) -> Callable:
  """A (state, batch) train step -> a (state, device inputs) one that
  gathers the batch of state.step itself."""

  def step(state, inputs):
    return train_step(state, gather_train_batch(
        inputs, state.step, global_batch_size=global_batch_size, mesh=mesh))

  return step


def gather_test_batch(on_device: Mapping[str, jax.Array], batch: jax.Array,
                      *, global_batch_size: int, mesh: jax.sharding.Mesh
                      ) -> dict[str, jax.Array]:
  """Inside jit: global test batch `batch` exactly as `test_dataset` builds
  it (examples [b*G, (b+1)*G), rows past N zero and masked)."""
  num_examples = on_device["label"].shape[0]
  index = batch * global_batch_size + jnp.arange(global_batch_size,
                                                 dtype=jnp.int32)
  index = jax.lax.with_sharding_constraint(index,
                                           parallel.batch_sharding(mesh))
  mask = index < num_examples
  safe = jnp.minimum(index, num_examples - 1)
  image = jnp.where(mask[:, None, None], on_device["image"][safe],
                    jnp.zeros((), jnp.uint8))
  label = jnp.where(mask, on_device["label"][safe], 0)
  return {"image": image, "label": label, "mask": mask}
