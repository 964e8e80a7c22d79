"""Tests of on-device preprocessing and augmentation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_resnet.model import preprocess

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


def asymmetric_images(batch: int = 3) -> np.ndarray:
  """Digit-like uint8 images with no mirror symmetry (an 'L' plus a dot)."""
  images = np.zeros((batch, 28, 28), np.uint8)
  images[:, 6:22, 9:12] = 255    # vertical bar
  images[:, 19:22, 12:20] = 200  # foot to the right
  images[:, 7, 18] = 90          # a dot up right
  for i in range(batch):
    images[i, 12, 14 + i] = 50 + i  # make examples differ
  return images


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(size, dtype):
  out = preprocess.to_model_input(jnp.asarray(asymmetric_images(2)),
                                  image_size=size, dtype=dtype)
  assert out.shape == (2, size, size, 3) and out.dtype == dtype


def test_caffe_values_are_bgr_minus_mean():
  images = np.zeros((1, 28, 28), np.uint8)
  images[0, 0, 0] = 255
  images[0, 0, 1] = 17
  out = np.asarray(preprocess.to_model_input(jnp.asarray(images),
                                             image_size=28))
  np.testing.assert_array_equal(out[0, 5, 5], -CAFFE_MEAN_BGR)  # black
  np.testing.assert_array_equal(out[0, 0, 0], 255 - CAFFE_MEAN_BGR)
  np.testing.assert_array_equal(out[0, 0, 1], 17 - CAFFE_MEAN_BGR)


def test_caffe_matches_keras_preprocess_input():
  from mnist_resnet.core.tf_host import import_keras
  keras = import_keras()
  images = asymmetric_images(2)
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.float32)
  rgb = np.repeat(padded[..., None], 3, axis=-1)
  expected = keras.applications.resnet.preprocess_input(rgb)
  out = preprocess.to_model_input(jnp.asarray(images), image_size=32)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_torch_values():
  images = np.zeros((1, 28, 28), np.uint8)
  images[0, 3, 4] = 255
  out = np.asarray(preprocess.to_model_input(
      jnp.asarray(images), image_size=28, convention="torch"))
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  np.testing.assert_allclose(out[0, 0, 0], -mean / std, rtol=1e-6)
  np.testing.assert_allclose(out[0, 3, 4], (1 - mean) / std, rtol=1e-6)


@pytest.mark.parametrize("convention", ["caffe", "torch"])
def test_padding_is_background(convention):
  images = jnp.asarray(asymmetric_images(1))
  out = np.asarray(preprocess.to_model_input(images, image_size=32,
                                             convention=convention))
  black = np.asarray(preprocess.to_model_input(
      jnp.zeros((1, 28, 28), jnp.uint8), image_size=28,
      convention=convention))[0, 0, 0]
  for border in (out[0, :2], out[0, -2:], out[0, :, :2], out[0, :, -2:]):
    np.testing.assert_array_equal(border, np.broadcast_to(black,
                                                          border.shape))
  inner = np.asarray(preprocess.to_model_input(images, image_size=28,
                                               convention=convention))
  np.testing.assert_array_equal(out[0, 2:-2, 2:-2], inner[0])


def test_resize_keeps_32_framing():
  # Ink up to the very edge, so resizing without the 2-pixel pad shows.
  images = asymmetric_images(2)
  images[:, 0, :] = 255
  images[:, :, -1] = 180
  out64 = np.asarray(preprocess.to_model_input(jnp.asarray(images),
                                               image_size=64))
  # Independent reference: pad 28 -> 32 with black, then 2x bilinear.
  padded = np.pad(images.astype(np.float32), ((0, 0), (2, 2), (2, 2)))
  ref = np.asarray(jax.image.resize(padded, (2, 64, 64), "bilinear",
                                    antialias=False))
  np.testing.assert_allclose(out64, ref[..., None] - CAFFE_MEAN_BGR,
                             atol=1e-3)
  # Exactly 3 background rows/columns on each side (the 4th blends in ink).
  black = -CAFFE_MEAN_BGR
  for border in (out64[:, :3], out64[:, -3:], out64[:, :, :3],
                 out64[:, :, -3:]):
    np.testing.assert_array_equal(border, np.broadcast_to(black,
                                                          border.shape))
  assert (out64[:, 3, 8:56] > black).all()
  assert (out64[:, 8:56, -4] > black).all()
  # Below 32 (other than 28): bare bilinear resize of the 28x28 digit.
  out30 = np.asarray(preprocess.to_model_input(jnp.asarray(images),
                                               image_size=30))
  ref30 = np.asarray(jax.image.resize(images.astype(np.float32), (2, 30, 30),
                                      "bilinear", antialias=False))
  np.testing.assert_allclose(out30, ref30[..., None] - CAFFE_MEAN_BGR,
                             atol=1e-3)


def test_float_input_same_as_uint8():
  images = asymmetric_images(2)
  a = preprocess.to_model_input(jnp.asarray(images), image_size=32)
  b = preprocess.to_model_input(jnp.asarray(images, jnp.float32),
                                image_size=32)
  np.testing.assert_array_equal(a, b)


def test_jittable_with_static_options():
  fn = jax.jit(functools.partial(preprocess.to_model_input, image_size=64,
                                 dtype=jnp.bfloat16))
  assert fn(jnp.asarray(asymmetric_images(2))).shape == (2, 64, 64, 3)


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """`image` translated by (dy, dx) with zero fill."""
  h, w = image.shape
  padded = np.pad(image, ((abs(dy), abs(dy)), (abs(dx), abs(dx))))
  return padded[abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w]


def test_augment_is_an_exact_shift_never_a_flip():
  images = asymmetric_images(3)
  augment = jax.jit(functools.partial(preprocess.augment, max_shift=2))
  seen = set()
  for seed in range(8):
    out = np.asarray(augment(jnp.asarray(images), jax.random.key(seed)))
    assert out.shape == images.shape and out.dtype == np.float32
    for i in range(len(images)):
      matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if np.array_equal(out[i], shifted(images[i], dy, dx))]
      assert len(matches) == 1, f"example {i} is not a pure shift"
      seen.add(matches[0])
      assert not np.array_equal(out[i], shifted(images[i][:, ::-1], 0, 0))
  assert len(seen) > 5  # shifts vary across examples and keys


def test_augment_deterministic_per_key_and_per_example():
  images = jnp.asarray(np.repeat(asymmetric_images(1), 16, axis=0))
  key = jax.random.key(7)
  a = np.asarray(preprocess.augment(images, key, max_shift=2))
  b = np.asarray(preprocess.augment(images, key, max_shift=2))
  np.testing.assert_array_equal(a, b)
  # Identical inputs, different outcomes: each example has its own key.
  assert len({x.tobytes() for x in a}) > 1
  c = np.asarray(preprocess.augment(images, jax.random.key(8), max_shift=2))
  assert not np.array_equal(a, c)


def bar_images(batch: int) -> np.ndarray:
  """A horizontal 16x2 bar centred on the image centre (13.5, 13.5)."""
  images = np.zeros((batch, 28, 28), np.uint8)
  images[:, 13:15, 6:22] = 255
  return images


def bar_geometry(image: np.ndarray) -> tuple[float, float, np.ndarray]:
  """(angle in degrees, length along the long axis, centroid) from the
  image's intensity moments; length is sqrt(12 * variance), exact for a
  uniform bar."""
  w = image / image.sum()
  yy, xx = np.mgrid[:28, :28]
  cy, cx = (w * yy).sum(), (w * xx).sum()
  vyy = (w * (yy - cy) ** 2).sum()
  vxx = (w * (xx - cx) ** 2).sum()
  vxy = (w * (yy - cy) * (xx - cx)).sum()
  angle = 0.5 * np.degrees(np.arctan2(2 * vxy, vxx - vyy))
  major = 0.5 * (vxx + vyy) + np.sqrt(0.25 * (vxx - vyy) ** 2 + vxy ** 2)
  return float(angle), float(np.sqrt(12 * major)), np.array([cy, cx])


def test_augment_affine():
  # Rotation and scale measured on a bar: the untouched bar is the baseline.
  bars = bar_images(16)
  angle0, length0, centre0 = bar_geometry(bars[0].astype(np.float64))
  assert abs(angle0) < 1e-6 and abs(length0 - 16) < 0.1
  key = jax.random.key(3)

  # Rotation only: the bar turns (both ways, within the range), keeps its
  # length, and turns about the image centre.
  rotate = jax.jit(functools.partial(preprocess.augment, max_shift=0,
                                     max_rotation_deg=15.0))
  out = np.asarray(rotate(jnp.asarray(bars), key))
  assert out.shape == bars.shape and out.dtype == np.float32
  assert out.min() >= 0 and out.max() <= 255 + 1e-3  # bilinear: no overshoot
  np.testing.assert_array_equal(out, rotate(jnp.asarray(bars), key))
  rotated = [bar_geometry(o.astype(np.float64)) for o in out]
  angles = np.array([g[0] for g in rotated])
  assert np.abs(angles).max() <= 15.5
  assert angles.max() > 3 and angles.min() < -3
  for _, length, centre in rotated:
    assert abs(length / length0 - 1) < 0.02
    np.testing.assert_allclose(centre, centre0, atol=0.05)
  # Scale only: the bar's length changes (both ways, within the range), its
  # angle and centre do not.
  out = np.asarray(jax.jit(functools.partial(
      preprocess.augment, max_shift=0, max_scale=0.1))(jnp.asarray(bars), key))
  scaled = [bar_geometry(o.astype(np.float64)) for o in out]
  ratios = np.array([g[1] / length0 for g in scaled])
  assert ratios.min() > 0.88 and ratios.max() < 1.12
  assert ratios.max() > 1.03 and ratios.min() < 0.97
  for angle, _, centre in scaled:
    assert abs(angle) < 0.5
    np.testing.assert_allclose(centre, centre0, atol=0.05)

  # Rotation and scale both off: the whole-pixel shift path, exactly.
  shift_only = np.asarray(jax.jit(functools.partial(
      preprocess.augment, max_shift=2, max_rotation_deg=0.0, max_scale=0.0))(
          jnp.asarray(bars), key))
  for i in range(len(bars)):
    assert any(np.array_equal(shift_only[i], shifted(bars[i], dy, dx))
               for dy in range(-2, 3) for dx in range(-2, 3))
  # Identity when every range is zero.
  same = preprocess.augment(jnp.asarray(bars), key, max_shift=0)
  np.testing.assert_array_equal(same, bars.astype(np.float32))


def test_augmentation_keeps_each_image_with_its_label_and_never_flips():
  """Augmented example i is a small transform of input i (so labels stay
  aligned), and is closer to its input than to the input's mirror images."""
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 2, size=(16, 5, 5)).astype(np.uint8) * 255
  images = np.zeros((16, 28, 28), np.uint8)  # Random 4x4-pixel blocks.
  images[:, 4:24, 4:24] = np.kron(blocks, np.ones((4, 4), np.uint8))
  x = images.astype(np.float32)

  def distance(a, b):  # L1 distance at the best alignment within 3 pixels.
    p = np.pad(b, 3)
    return min(float(np.abs(a - p[3 + dy:31 + dy, 3 + dx:31 + dx]).sum())
               for dy in range(-3, 4) for dx in range(-3, 4))

  for kwargs in ({"max_shift": 2},
                 {"max_shift": 2, "max_rotation_deg": 10, "max_scale": 0.1}):
    out = np.asarray(preprocess.augment(jnp.asarray(images),
                                        jax.random.key(1), **kwargs))
    for i in range(16):
      own = distance(out[i], x[i])
      assert own < min(distance(out[i], x[j]) for j in range(16) if j != i)
      assert own < distance(out[i], x[i, :, ::-1])
      assert own < distance(out[i], x[i, ::-1, :])
