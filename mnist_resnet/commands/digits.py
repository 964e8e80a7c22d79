"""Image files and idx files -> digits in MNIST's form, for `predict`.

An image is brought into MNIST's form the way the dataset was made (LeCun et
al.): grey, a light digit on a black ground (inverted when the ground is
light), cropped to the ink's bounding box, scaled with anti-aliasing so its
larger side is 20 pixels, and placed in a 28x28 field with its centre of mass
at the centre. Images in an idx file are in that form already.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageFile
from PIL import ImageOps

from mnist_resnet.core.errors import DataError
from mnist_resnet.core.errors import one_line
from mnist_resnet.data import idx
from mnist_resnet.data import mnist

# The digit's larger side in the 28x28 field, as in MNIST.
FIT_SIZE = 20
# Ink below this fraction of the darkest (or lightest) stroke counts as
# ground: JPEG ringing and paper texture stay out of the digit.
FLOOR_FRACTION = 0.05
# The least difference between ink and ground (on a 0-1 scale) that counts
# as a digit; less is a blank page, or a blank page's noise.
MIN_CONTRAST = 0.08
# Ink less than this many standard deviations of the ground's noise away
# from it is ground.
NOISE_SIGMAS = 4.0
# Rows or columns at the edge of the ink that together hold less than this
# fraction of it are specks, not part of the digit.
SPECK_FRACTION = 0.002

_GZIP_MAGIC = b"\x1f\x8b"
_MNIST_IMAGES_MAGIC = b"\x00\x00\x08\x03"


class NoDigit(DataError):
  """An image holds nothing that stands out from its ground."""


@dataclasses.dataclass(frozen=True)
class Digit:
  """One image as the model sees it, and where it came from."""
  file: str
  index: int | None  # Position in an idx file; None for an image file.
  image: np.ndarray  # uint8 [28, 28], light digit on black.


def to_mnist(grey: np.ndarray) -> np.ndarray:
  """A 2-D grey image (0 black; uint8 and uint16 on their full scale,
  floats in [0, 1]) -> uint8 [28, 28] in MNIST's form: light digit on
  black, the ink's bounding box scaled to fit 20x20, centre of mass at the
  centre.

  Raises:
    NoDigit: nothing in the image stands out from its ground.
  """
  ink = ink_levels(unit_scale(grey))
  rows, cols = ink_box(ink)
  digit = fit(ink[rows, cols], FIT_SIZE)
  return to_uint8(centre(digit, mnist.IMAGE_SIZE))


def unit_scale(grey: np.ndarray) -> np.ndarray:
  """Grey levels as float64 in [0, 1]."""
  grey = np.asarray(grey)
  if grey.ndim != 2 or grey.size == 0:
    raise ValueError(f"a grey image is a non-empty 2-D array, got shape "
                     f"{grey.shape}")
  if grey.dtype.kind == "u" and grey.dtype.itemsize <= 2:
    return grey.astype(np.float64) / np.iinfo(grey.dtype).max
  if grey.dtype.kind == "f":
    return np.clip(grey.astype(np.float64), 0.0, 1.0)
  return by_range(grey)


def by_range(grey: np.ndarray) -> np.ndarray:
  """Grey levels of no set scale (Pillow's 32-bit modes, plain integers)
  as float64 in [0, 1]: the scale is 1, 8 or 16 bits, whichever holds
  them."""
  grey = np.clip(np.asarray(grey, np.float64), 0.0, None)
  top = float(grey.max())
  return grey / next((s for s in (1.0, 255.0, 65535.0) if top <= s), top)


def border(x: np.ndarray) -> np.ndarray:
  """The outermost pixels of a 2-D array, each once."""
  if min(x.shape) <= 2:
    return x.reshape(-1)
  return np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])


def ground_levels(x: np.ndarray) -> tuple[np.ndarray, float]:
  """The ground's grey level at every pixel, and its noise (a standard
  deviation), from the border, where a digit rarely reaches.

  The ground is a plane, not one level: light falls unevenly across a
  photo. Border pixels far from the fit (a stroke reaching the edge) are
  left out of it, as the median leaves them out of a single level.
  """
  h, w = x.shape
  rows, cols = np.indices((h, w), sparse=True)
  rows, cols = rows / h, cols / w
  values = border(x)
  coords = np.stack([np.ones(values.size),
                     border(np.broadcast_to(rows, (h, w))),
                     border(np.broadcast_to(cols, (h, w)))], axis=1)
  plane = np.array([np.median(values), 0.0, 0.0])
  for _ in range(2):
    residual = values - coords @ plane
    sigma = 1.4826 * float(np.median(np.abs(residual)))
    inliers = np.abs(residual) <= max(3.0 * sigma, 2.0 / 255)
    plane = np.linalg.lstsq(coords[inliers], values[inliers], rcond=None)[0]
  residual = values - coords @ plane
  sigma = 1.4826 * float(np.median(np.abs(residual)))
  return plane[0] + plane[1] * rows + plane[2] * cols, sigma


def ink_levels(x: np.ndarray) -> np.ndarray:
  """Grey levels in [0, 1] -> how much ink each pixel holds, in [0, 1]: the
  ground 0, the strongest stroke 1, whichever way round the image is.

  The ink is the extreme farther from the ground, so dark ink on paper and
  light ink on a dark ground both come out light on black.
  """
  ground, sigma = ground_levels(x)
  ink = x - ground
  if -ink.min() > ink.max():
    ink = -ink  # Dark ink on a light ground: inverted.
  ink = np.clip(ink, 0.0, None)
  peak = float(ink.max())
  # The ground's noise (sensor, JPEG, paper texture) stays ground.
  floor = max(NOISE_SIGMAS * sigma, FLOOR_FRACTION * peak)
  if peak - floor < MIN_CONTRAST:
    raise NoDigit("no digit: nothing stands out from the background "
                  "(a blank image?)")
  return np.clip((ink - floor) / (peak - floor), 0.0, 1.0)


def ink_box(ink: np.ndarray) -> tuple[slice, slice]:
  """The rows and columns of the ink's bounding box, less stray specks."""
  inked = ink > 0
  padded = np.pad(inked, 1)
  h, w = inked.shape
  neighbours = sum(padded[1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
                   for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                   if dr or dc)
  # A lone inked pixel is noise or dust, not a stroke.
  mass = np.where(inked & (neighbours > 0), ink, 0.0)
  if not mass.any():
    mass = ink
  return span(mass.sum(axis=1)), span(mass.sum(axis=0))


def span(mass: np.ndarray) -> slice:
  """The indices from the first to the last holding ink, less the rows (or
  columns) at either end that together hold under SPECK_FRACTION of it:
  one speck of dust or noise far from the digit would otherwise shrink the
  digit to fit the box."""
  cum = np.cumsum(mass)
  total = cum[-1]
  start = int(np.searchsorted(cum, SPECK_FRACTION * total, side="right"))
  end = int(np.searchsorted(cum, (1.0 - SPECK_FRACTION) * total)) + 1
  return slice(start, max(end, start + 1))


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights that resample a line of n_in pixels to n_out.

  Shrinking averages the input pixels each output pixel covers, in
  proportion to the overlap (area resampling: anti-aliased, and the exact
  inverse of an enlargement by pixel repetition). Growing interpolates
  linearly between the nearest two input pixels.
  """
  scale = n_in / n_out
  lo = np.arange(n_out)[:, None] * scale  # Each output pixel's footprint.
  x = np.arange(n_in)[None, :]
  if scale >= 1.0:
    w = np.minimum(lo + scale, x + 1) - np.maximum(lo, x)
  else:
    w = 1.0 - np.abs(x + 0.5 - (lo + scale / 2))
  w = np.clip(w, 0.0, None)
  return w / w.sum(axis=1, keepdims=True)


def fit(crop: np.ndarray, size: int) -> np.ndarray:
  """Scales `crop` so its larger side is `size` pixels, aspect kept."""
  h, w = crop.shape
  scale = size / max(h, w)
  oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
  out = resize_weights(h, oh) @ crop @ resize_weights(w, ow).T
  # Thin strokes of a large image fade when shrunk; the strongest pixel of
  # the digit is full ink again, as in MNIST.
  return out / out.max()


def centre(digit: np.ndarray, size: int) -> np.ndarray:
  """`digit` in a size x size black field, its centre of mass on the
  centre pixel (size // 2; MNIST's lie within half a pixel of 14), moved
  back inside the field where it would leave it."""
  h, w = digit.shape
  mass = digit.sum()
  com_r = (digit.sum(axis=1) @ np.arange(h)) / mass
  com_c = (digit.sum(axis=0) @ np.arange(w)) / mass
  top = int(np.clip(np.floor(size // 2 - com_r + 0.5), 0, size - h))
  left = int(np.clip(np.floor(size // 2 - com_c + 0.5), 0, size - w))
  out = np.zeros((size, size), np.float64)
  out[top:top + h, left:left + w] = digit
  return out


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[0, 1] -> MNIST's 0-255 uint8 scale."""
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Reading files


def flatten_alpha(grey: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """Grey levels of a transparent image laid on a ground its drawing stands
  out from (both arrays in [0, 1]).

  Mostly opaque (a scan or photo with transparent margins): the margins
  take the colour of the opaque part. Mostly transparent (strokes on an
  empty canvas): the ground is the opposite of the strokes, white under
  dark ink and black under light ink; a fixed white ground would hide white
  strokes.
  """
  if alpha.min() >= 1.0:
    return grey
  if alpha.max() <= 0.0:
    return np.ones_like(grey)  # Nothing drawn: a blank image.
  order = np.argsort(grey, axis=None)
  weight = np.cumsum(alpha.reshape(-1)[order])
  typical = grey.reshape(-1)[order][np.searchsorted(weight, weight[-1] / 2)]
  if alpha.mean() > 0.5:
    ground = typical
  else:
    ground = 1.0 if typical < 0.5 else 0.0
  return alpha * grey + (1.0 - alpha) * ground


def read_grey(path: str) -> np.ndarray:
  """An image file's grey levels as float64 [H, W] in [0, 1] (0 black).

  Raises:
    DataError: the file is not an image Pillow can read, or is truncated.
  """
  # A truncated file must be an error, not a digit with a grey lower half.
  ImageFile.LOAD_TRUNCATED_IMAGES = False
  try:
    with Image.open(path) as img:
      img.load()
      # Phone photos are stored sideways with an orientation tag.
      img = ImageOps.exif_transpose(img)
      return _grey_levels(img)
  except Image.UnidentifiedImageError:
    raise DataError(f"{path}: not an image file (or a format Pillow cannot "
                    "read)") from None
  except OSError as e:
    if e.strerror:  # The file itself: permissions, I/O.
      raise DataError(f"{path}: cannot read: {e.strerror}") from None
    raise DataError(f"{path}: damaged image: {one_line(e)}") from None
  except (SyntaxError, ValueError, EOFError, IndexError,
          Image.DecompressionBombError) as e:
    # Pillow's decoders report corrupt data with any of these.
    raise DataError(f"{path}: damaged image: {one_line(e)}") from None


def _grey_levels(img: Image.Image) -> np.ndarray:
  """A loaded Pillow image -> float64 grey levels in [0, 1]."""
  if img.mode == "LAB":  # Pillow has no LAB -> L; L* is the lightness.
    return np.asarray(img.getchannel("L"), np.float64) / 255.0
  if img.mode.startswith("I;16"):
    return unit_scale(np.asarray(img))
  if img.mode in ("I", "F"):
    # 32-bit grey: converting to "L" would clip it to 255.
    return by_range(np.asarray(img))
  if img.mode in ("RGBA", "LA", "PA", "RGBa") or (
      "transparency" in img.info):  # A palette or colour key with alpha.
    rgba = img.convert("RGBA")
    grey = np.asarray(rgba.convert("L"), np.float64) / 255.0
    alpha = np.asarray(rgba.getchannel("A"), np.float64) / 255.0
    return flatten_alpha(grey, alpha)
  return np.asarray(img.convert("L"), np.float64) / 255.0


def is_idx(path: str) -> bool:
  """Whether `path` is an idx file rather than an image: gzip-compressed (no
  image format is), MNIST's image magic number, or an idx magic (two zero
  bytes) under an idx name."""
  with open(path, "rb") as f:
    head = f.read(4)
  return (head[:2] == _GZIP_MAGIC or head == _MNIST_IMAGES_MAGIC or
          (head[:2] == b"\0\0" and "idx" in os.path.basename(path).lower()))


def read_idx_images(path: str) -> np.ndarray:
  """The uint8 [N, 28, 28] images of an idx file."""
  images = idx.read_idx(path)
  if images.dtype != np.uint8 or images.shape[1:] != mnist.IMAGE_SHAPE:
    raise DataError(f"{path}: holds {images.dtype} {list(images.shape)}, "
                    "not uint8 images [N, 28, 28] (an -idx3-ubyte file)")
  if not len(images):
    raise NoDigit(f"{path}: holds no images")
  return images


def read_digits(path: str) -> list[Digit]:
  """Every image of one file, in MNIST's form (raises DataError)."""
  try:
    idx_file = is_idx(path)
  except OSError as e:
    raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
  if idx_file:
    return [Digit(path, i, image)
            for i, image in enumerate(read_idx_images(path))]
  try:
    image = to_mnist(read_grey(path))
  except NoDigit as e:
    raise NoDigit(f"{path}: {e}") from None
  return [Digit(path, None, image)]


def read_all(paths: Sequence[str]) -> tuple[list[Digit], bool]:
  """The digits of every file that can be read, and whether any could not;
  each failure is one `error:` line on stderr."""
  digits, failed = [], False
  for path in paths:
    try:
      digits.extend(read_digits(path))
    except DataError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      failed = True
  return digits, failed
