"""The training order: which examples make up the global batch at each step.

The order is a pure function of (seed, step), and each process takes its own
rows of every global batch. This module holds the definition
(`global_batch_indices`, numpy, 32-bit integer arithmetic) and its twins for
the two input pipelines, which must reproduce it bit for bit: one in
TensorFlow ops (TensorFlow is passed in, never imported here) and one in
jax.numpy. Why and how: docs/training.md#the-training-order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mnist_resnet.core.errors import DataError


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped)."""
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be positive, got "
                     f"{global_batch_size}")
  return num_examples // global_batch_size


_MIX_MUL1 = 0x7FEB352D
_MIX_MUL2 = 0x846CA68B
_SEED_SALT = 0x243F6A88
_KEY2_SALT = 0x85A308D3
_MASK32 = 0xFFFFFFFF


def _mix32(x: np.ndarray) -> np.ndarray:
  """A bijection of uint32 with full avalanche (Wellons' lowbias32)."""
  x = x ^ (x >> 16)
  x = x * np.uint32(_MIX_MUL1)
  x = x ^ (x >> 15)
  x = x * np.uint32(_MIX_MUL2)
  return x ^ (x >> 16)


def _epoch_keys(seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
  seed %= 2**64
  # Shape (1,), not 0-d: numpy warns on wrapping scalar arithmetic but not on
  # arrays, and wrapping is intended here.
  u32 = lambda v: np.array([v & _MASK32], dtype=np.uint32)
  a = _mix32(u32(seed) ^ np.uint32(_SEED_SALT))
  a = _mix32(a ^ u32(seed >> 32))
  a = _mix32(a ^ u32(epoch))
  a = _mix32(a ^ u32(epoch >> 32))
  return a, _mix32(a ^ np.uint32(_KEY2_SALT))


def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of epoch `epoch`: a pure function of (seed, epoch).

  Each example gets the key mix(mix(i ^ k1) + k2) with (k1, k2) derived from
  (seed, epoch); mix is a bijection, so keys are distinct and sorting them
  gives one well-defined pseudo-random permutation, the same on every machine
  and library version.
  """
  if num_examples >= 2**32:
    raise ValueError(f"at most 2^32 - 1 examples, got {num_examples}")
  k1, k2 = _epoch_keys(seed, epoch)
  keys = _mix32(_mix32(np.arange(num_examples, dtype=np.uint32) ^ k1) + k2)
  return np.argsort(keys)


def _epoch_permutation_tf(tf, num_examples: int, seed: int, epoch):
  """`_epoch_permutation` in TensorFlow ops, for a scalar int64 `epoch`."""

  def mix(x):
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, u32(16)))
    x = x * u32(_MIX_MUL1)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, u32(15)))
    x = x * u32(_MIX_MUL2)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, u32(16)))

  def u32(v):
    return tf.constant(v & _MASK32, tf.uint32)

  def low32(v):  # int64 tensor -> its low 32 bits as uint32.
    return tf.cast(tf.bitwise.bitwise_and(v, tf.constant(_MASK32, tf.int64)),
                   tf.uint32)

  seed %= 2**64
  epoch = tf.cast(epoch, tf.int64)
  a = mix(tf.bitwise.bitwise_xor(u32(seed), u32(_SEED_SALT)))
  a = mix(tf.bitwise.bitwise_xor(a, u32(seed >> 32)))
  a = mix(tf.bitwise.bitwise_xor(a, low32(epoch)))
  a = mix(tf.bitwise.bitwise_xor(a, low32(tf.bitwise.right_shift(
      epoch, tf.constant(32, tf.int64)))))
  k1, k2 = a, mix(tf.bitwise.bitwise_xor(a, u32(_KEY2_SALT)))
  index = tf.cast(tf.range(num_examples, dtype=tf.int64), tf.uint32)
  keys = mix(mix(tf.bitwise.bitwise_xor(index, k1)) + k2)
  # Keys are distinct, so any sort gives the same order as numpy's.
  return tf.argsort(tf.cast(keys, tf.int64), stable=True)


def epoch_permutation_jax(num_examples: int, seed: int,
                          epoch: jax.Array) -> jax.Array:
  """`_epoch_permutation` in jax.numpy, for a traced uint32 scalar `epoch`
  (epochs past 2^32 would need its high word, which is 0 here)."""
  if num_examples >= 2**32:
    raise ValueError(f"at most 2^32 - 1 examples, got {num_examples}")

  def mix(x):  # uint32 arithmetic wraps, as in numpy.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_MIX_MUL1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_MIX_MUL2)
    return x ^ (x >> 16)

  seed %= 2**64
  u32 = lambda v: jnp.uint32(v & _MASK32)
  a = mix(u32(seed) ^ u32(_SEED_SALT))
  a = mix(a ^ u32(seed >> 32))
  a = mix(a ^ jnp.asarray(epoch, jnp.uint32))
  a = mix(a ^ u32(0))
  k1, k2 = a, mix(a ^ u32(_KEY2_SALT))
  keys = mix(mix(jnp.arange(num_examples, dtype=jnp.uint32) ^ k1) + k2)
  # Keys are distinct, so any sort gives the same order as numpy's.
  return jnp.argsort(keys).astype(jnp.int32)


def global_batch_indices(num_examples: int, global_batch_size: int, seed: int,
                         step: int) -> np.ndarray:
  """Example indices of the global batch at `step` (reference definition)."""
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  spe = steps_per_epoch(num_examples, global_batch_size)
  epoch, index = divmod(step, spe)
  perm = _epoch_permutation(num_examples, seed, epoch)
  return perm[index * global_batch_size:(index + 1) * global_batch_size]


def _local_batch_size(global_batch_size: int, process_index: int,
                      process_count: int) -> int:
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, {process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataError(f"global batch size {global_batch_size} does not split "
                    f"evenly over {process_count} processes")
  return global_batch_size // process_count
