"""tf.data pipelines of uint8 MNIST batches for training and evaluation.

The training pipeline follows `order` exactly (its TensorFlow twin of the
order runs inside the graph); the test pipeline visits every example once.
Both ship uint8 images: conversion, resizing and normalisation happen on the
accelerator. TensorFlow is imported only when a pipeline is built, through
`tf_host`, which keeps it off the GPUs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from mnist_resnet import mnist
from mnist_resnet import order
from mnist_resnet import tf_host

if TYPE_CHECKING:
  import tensorflow as tf

# Images gathered per tf.data element before it is split into steps: enough
# to amortise per-element overhead at small batch sizes (16 steps of 128),
# small enough that the first batch comes quickly and buffers stay small.
_CHUNK_IMAGES = 2048


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
  tf = tf_host.import_tensorflow()
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
  tf = tf_host.import_tensorflow()
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
