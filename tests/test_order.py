"""Tests for mnist_resnet.data.order: the training order's reference definition.

That the pipelines follow it is tested in test_data.py.
"""

import numpy as np
import pytest

from mnist_resnet.core.errors import DataError
from mnist_resnet.data import order


@pytest.mark.parametrize("args,first", [
    ((60000, 128, 0, 0), [11650, 40475, 49518, 45272, 43589, 10349, 51631]),
    ((60000, 128, 1, 468), [47384, 53404, 41827, 6389, 32395, 46441, 20851]),
    ((1000, 100, -1, 10), [959, 132, 488, 751, 662, 264, 287]),
    ((100, 10, 2**33 + 5, 10 * (2**32 + 3) + 7), [65, 9, 58, 74, 25, 13, 90]),
])
def test_order_is_pinned(args, first):
  """The order never changes: a resumed run must see the batches it expects."""
  batch = order.global_batch_indices(*args)
  assert len(batch) == args[1]
  assert batch[:len(first)].tolist() == first


def test_steps_per_epoch_drops_the_remainder():
  assert order.steps_per_epoch(1050, 100) == 10
  assert order.steps_per_epoch(60000, 60000) == 1
  assert order.steps_per_epoch(60000, 60001) == 0  # Config validation's job.
  with pytest.raises(ValueError):
    order.steps_per_epoch(60000, 0)


def test_epochs_differ_and_reference_is_a_permutation():
  a = np.concatenate([order.global_batch_indices(1000, 100, 0, s)
                      for s in range(10)])
  b = np.concatenate([order.global_batch_indices(1000, 100, 0, s)
                      for s in range(10, 20)])
  assert sorted(a.tolist()) == sorted(b.tolist()) == list(range(1000))
  assert not np.array_equal(a, b)
  # Drop remainder: 1050 examples at batch 100 -> 10 steps per epoch, each
  # epoch 1000 distinct examples, and step 10 starts a new permutation.
  epoch0 = np.concatenate([order.global_batch_indices(1050, 100, 0, s)
                           for s in range(10)])
  assert len(np.unique(epoch0)) == 1000 and epoch0.max() < 1050
  assert not np.array_equal(order.global_batch_indices(1050, 100, 0, 10),
                            order.global_batch_indices(1050, 100, 0, 0))


def test_orders_look_independent():
  n = 60000
  ranks = lambda perm: np.argsort(perm).astype(np.float64)
  base = ranks(np.concatenate([order.global_batch_indices(n, 1000, 0, s)
                               for s in range(60)]))
  for seed, step in ((0, 60), (1, 0), (2**40, 0)):
    other = ranks(np.concatenate([order.global_batch_indices(n, 1000, seed, s)
                                  for s in range(step, step + 60)]))
    assert abs(np.corrcoef(base, other)[0, 1]) < 0.02
  # Not close to file order either.
  assert abs(np.corrcoef(base, np.arange(n))[0, 1]) < 0.02


def test_seed_is_taken_modulo_2_64():
  np.testing.assert_array_equal(order.global_batch_indices(500, 50, -1, 3),
                                order.global_batch_indices(500, 50, 2**64 - 1,
                                                           3))


def test_local_batch_size():
  assert order._local_batch_size(1000, 3, 4) == 250
  with pytest.raises(DataError, match="does not split evenly over 3"):
    order._local_batch_size(100, 0, 3)
  with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
    order._local_batch_size(100, 2, 2)


def test_negative_step_rejected():
  with pytest.raises(ValueError, match="step must be >= 0"):
    order.global_batch_indices(1000, 100, 0, -1)


@pytest.mark.parametrize("num_examples, seed, epoch", [
    (60000, 0, 0), (60000, 0, 7), (1000, 2**40 + 5, 3), (97, -1, 2**31 - 1),
    (55000, 123, 1000)])
def test_jax_twin_equals_the_reference(num_examples, seed, epoch):
  """The device pipeline's order, computed by jax on the device, is the
  numpy definition bit for bit (high seed bits and large epochs too)."""
  import jax  # pylint: disable=g-import-not-at-top
  permutation = jax.jit(lambda e: order.epoch_permutation_jax(
      num_examples, seed, e))
  np.testing.assert_array_equal(
      np.asarray(permutation(np.uint32(epoch))),
      order._epoch_permutation(num_examples, seed, epoch))
