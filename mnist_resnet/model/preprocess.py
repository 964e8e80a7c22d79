"""On-device image preparation: MNIST uint8 -> model input, and augmentation.

Both functions are pure `jax.numpy`, jittable, and meant to run inside the
train step, so the host ships 784 bytes per image and the accelerator does the
resizing, channel replication and normalisation.

Scale convention: images are on MNIST's 0-255 scale throughout (uint8, or
float after `augment`); 0 is the black background, so zero padding and zero
fill always look like background.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from mnist_resnet.data import mnist

# Keras's "caffe" convention (what Keras's ImageNet ResNet weights expect):
# BGR channel order, 0-255 range, ImageNet mean subtracted, no scaling.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# torchvision's convention: RGB, 0-1 range, ImageNet mean and std.
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)
CONVENTIONS = ("caffe", "torch")

# 32x32 is the smallest input Keras's ResNet50 accepts and the size at which
# a 28x28 digit keeps a 2-pixel background margin.
_PADDED_SIZE = 32


@dataclasses.dataclass(frozen=True)
class ModelInput:
  """How a run turns uint8 digits into model input, with and without
  augmentation: the two must agree on everything but the augmentation."""
  image_size: int
  convention: str = "caffe"
  dtype: Any = jnp.float32
  max_shift: int = 0
  max_rotation_deg: float = 0.0
  max_scale: float = 0.0

  def for_eval(self, images: jax.Array) -> jax.Array:
    return to_model_input(images, image_size=self.image_size,
                          convention=self.convention, dtype=self.dtype)

  def for_training(self, images: jax.Array, key: jax.Array) -> jax.Array:
    """Augmented (keyed per example), then as `for_eval`."""
    images = augment(images, key, max_shift=self.max_shift,
                     max_rotation_deg=self.max_rotation_deg,
                     max_scale=self.max_scale)
    return self.for_eval(images)


def to_model_input(images: jax.Array, *, image_size: int,
                   convention: str = "caffe",
                   dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """[B, 28, 28] on the 0-255 scale -> normalised [B, S, S, 3] in `dtype`.

  Geometry: 28 -> unchanged; 32 -> 2 black pixels of padding on each side;
  larger sizes -> pad to 32 first, then bilinear upsampling, so the digit
  fills the same 28/32 of the frame at every size (a model fine-tuned at one
  size sees the same framing at another); sizes below 32 other than 28 ->
  bilinear resize of the bare 28x28 image. Padding happens before
  normalisation, with the value of a black pixel, so it is background.

  Normalisation: 'caffe' (Keras's ImageNet weights) gives channels in BGR
  order minus the ImageNet mean; 'torch' gives RGB in [0, 1] standardised
  with the ImageNet mean and std. MNIST is grey, so only the per-channel
  constants differ between channels.
  """
  x = images.astype(jnp.float32)
  if image_size >= _PADDED_SIZE and x.shape[1:] == mnist.IMAGE_SHAPE:
    m = (_PADDED_SIZE - mnist.IMAGE_SIZE) // 2
    x = jnp.pad(x, ((0, 0), (m, m), (m, m)))
  if x.shape[1:] != (image_size, image_size):
    # Upsampling: antialiasing would change nothing.
    x = jax.image.resize(x, (x.shape[0], image_size, image_size), "bilinear",
                         antialias=False)
  # Resize and pad on one channel, replicate last: 3x less work.
  x = x[..., None]
  if convention == "caffe":
    x = x - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)
  elif convention == "torch":
    x = (x / 255.0 - jnp.asarray(TORCH_MEAN_RGB, jnp.float32)) / jnp.asarray(
        TORCH_STD_RGB, jnp.float32)
  else:
    raise ValueError(f"unknown input convention {convention!r}")
  return x.astype(dtype)


def augment(images: jax.Array, key: jax.Array, *, max_shift: int = 2,
            max_rotation_deg: float = 0.0,
            max_scale: float = 0.0) -> jax.Array:
  """Random per-example translation (and optional rotation/scale), no flips.

  Returns float32 [B, H, W] on the input's 0-255 scale; uncovered pixels are
  filled with 0 (background). Each example draws from its own key
  (`jax.random.split(key, B)`), so a result depends only on `key` and the
  image, not on how the batch is sharded.

  With rotation and scale off, shifts are whole pixels and the result is an
  exact copy of a window of the zero-padded image (a cheap gather, no
  interpolation blur). Otherwise one affine warp about the image centre with
  bilinear sampling: scale s in [1 - max_scale, 1 + max_scale], angle in
  [-max_rotation_deg, max_rotation_deg], shift in [-max_shift, max_shift]
  pixels per axis. Digits are not mirror-symmetric, so flips are never used.
  Labels are not an argument: no augmentation here can change the class.
  """
  x = images.astype(jnp.float32)
  keys = jax.random.split(key, x.shape[0])
  if max_rotation_deg == 0 and max_scale == 0:
    if max_shift == 0:
      return x
    return jax.vmap(lambda img, k: _shift(img, k, int(max_shift)))(x, keys)
  warp = lambda img, k: _affine(img, k, float(max_shift),
                                math.radians(max_rotation_deg),
                                float(max_scale))
  return jax.vmap(warp)(x, keys)


def _shift(image: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Integer translation with zero fill: a window of the padded image."""
  h, w = image.shape
  dy, dx = jax.random.randint(key, (2,), -max_shift, max_shift + 1)
  padded = jnp.pad(image, max_shift)
  # Output pixel (i, j) shows input pixel (i - dy, j - dx).
  return jax.lax.dynamic_slice(padded, (max_shift - dy, max_shift - dx),
                               (h, w))


def _affine(image: jax.Array, key: jax.Array, max_shift: float,
            max_angle: float, max_scale: float) -> jax.Array:
  """Scale, rotate and translate about the centre; bilinear, zero fill."""
  h, w = image.shape
  k_angle, k_scale, k_shift = jax.random.split(key, 3)
  angle = jax.random.uniform(k_angle, (), minval=-max_angle, maxval=max_angle)
  scale = jax.random.uniform(k_scale, (), minval=1 - max_scale,
                             maxval=1 + max_scale)
  shift = jax.random.uniform(k_shift, (2,), minval=-max_shift,
                             maxval=max_shift)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                        jnp.arange(w, dtype=jnp.float32), indexing="ij")
  # Inverse map: for each output pixel, where it comes from in the input.
  y = yy - cy - shift[0]
  x = xx - cx - shift[1]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_y = (cos * y - sin * x) / scale + cy
  src_x = (sin * y + cos * x) / scale + cx
  return jax.scipy.ndimage.map_coordinates(image, [src_y, src_x], order=1,
                                           mode="constant", cval=0.0)
