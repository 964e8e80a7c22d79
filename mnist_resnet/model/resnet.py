"""ResNet v1 in flax.linen, laid out exactly like `keras.applications.ResNet50`.

The backbone copies Keras's architecture operation for operation and its
submodules carry Keras's layer names (`conv1_conv`, `conv2_block1_1_bn`,
...), so loading a Keras file is a rename-free copy (`pretrained.py`); the
details are in docs/training.md#pretrained-weights. Variables are split at
the top level into 'backbone' and 'head' in both 'params' and 'batch_stats';
the training code freezes the backbone by masking on that key.
"""

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Hidden head layers start like a Keras Dense layer would (Keras's default).
_DENSE_INIT = nn.initializers.glorot_uniform()
# The output layer starts at zero (as big_vision's heads do): every model,
# random or pretrained backbone, starts at uniform predictions, a loss of
# exactly ln 10. A Glorot layer on unnormalised pooled ReLU features starts
# at confidently wrong logits instead (ResNet50 from scratch: loss 4.55).
_LOGITS_INIT = nn.initializers.zeros
# He initialisation (fan-out, as in torchvision): the usual choice for training
# a ReLU ResNet from scratch; irrelevant when ImageNet weights are loaded.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pads(padding: Any, spatial: Sequence[int], window: Sequence[int],
          strides: Sequence[int]) -> list[tuple[int, int]]:
  """lax padding ('SAME', 'VALID' or (low, high) pairs) as explicit pairs."""
  if isinstance(padding, str):
    return list(jax.lax.padtype_to_pads(spatial, window, strides, padding))
  return [tuple(p) for p in padding]


def conv_as_dot(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                padding: Any, *, lhs_dilation: Any = None,
                rhs_dilation: Any = None, dimension_numbers: Any = None,
                feature_group_count: int = 1, precision: Any = None,
                preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated` for NHWC x HWIO, as one matrix product.

  im2col: the kernel taps that ever see data are gathered along the channel
  axis and multiplied by the kernel reshaped to [taps * C_in, C_out] (on a
  1x1 map a 3x3 'SAME' convolution is its centre tap alone). Same sums as the
  convolution, in another order. On CPU, XLA runs convolutions whose kernel is
  larger than the map about 4x slower than this product, and 1x1 ones 1.2x
  slower (docs/benchmarking.md, "CPU speed").
  """
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                        ("NHWC", "HWIO", "NHWC"))
  if dimension_numbers is not None and jax.lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, dimension_numbers) != nhwc:
    raise ValueError("conv_as_dot: only NHWC inputs and HWIO kernels")
  if (feature_group_count != 1 or any(d != 1 for d in lhs_dilation or ())
      or any(d != 1 for d in rhs_dilation or ())):
    raise ValueError("conv_as_dot: groups and dilation are not supported")
  kh, kw, cin, cout = rhs.shape
  b, h, w, _ = lhs.shape
  sh, sw = window_strides
  (pt, pb), (pl, pr) = _pads(padding, (h, w), (kh, kw), (sh, sw))
  ho = (h + pt + pb - kh) // sh + 1
  wo = (w + pl + pr - kw) // sw + 1
  x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))

  def sees_data(tap, stride, out, low, size):
    return any(low <= tap + stride * o < low + size for o in range(out))

  cols, taps = [], []
  for i in range(kh):
    if not sees_data(i, sh, ho, pt, h):
      continue
    for j in range(kw):
      if not sees_data(j, sw, wo, pl, w):
        continue
      cols.append(jax.lax.slice(
          x, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1,
                            cin), (1, sh, sw, 1)))
      taps.append(rhs[i, j])
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  kernel = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=0)
  return jax.lax.dot_general(
      patches, kernel, (((3,), (0,)), ((), ())), precision=precision,
      preferred_element_type=preferred_element_type)


class _Backbone(nn.Module):
  """Stem + residual stages + global average pool; Keras layer names inside."""
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  stem_width: int
  bn_momentum: float
  bn_epsilon: float
  zero_init_residual: bool
  dtype: Any
  use_conv_as_dot: bool

  def _conv(self, x: jax.Array, features: int, kernel: int, stride: int,
            padding: Any, name: str) -> jax.Array:
    # 1x1 kernels, and kernels larger than the map, as matrix products (see
    # conv_as_dot); XLA's own convolutions are faster for the others.
    as_dot = self.use_conv_as_dot and (kernel == 1
                                       or min(x.shape[1:3]) < kernel)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=padding, use_bias=True, dtype=self.dtype,
                   param_dtype=jnp.float32, kernel_init=_CONV_INIT,
                   conv_general_dilated=conv_as_dot if as_dot else None,
                   name=name)(x)

  def _bn(self, x: jax.Array, train: bool, name: str,
          zero_scale: bool = False) -> jax.Array:
    # Two-pass variance (E[(x - mean)^2]), the formula Keras uses, so
    # training-mode outputs agree with Keras's as closely as float32 allows.
    return nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum,
        epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=(nn.initializers.zeros if zero_scale
                    else nn.initializers.ones),
        name=name)(x)

  def _block(self, x: jax.Array, width: int, stride: int, projection: bool,
             train: bool, name: str) -> jax.Array:
    """Keras `residual_block_v1`: 1x1 (strided) -> 3x3 -> 1x1, 4x expansion."""
    if projection:
      shortcut = self._conv(x, 4 * width, 1, stride, "VALID", f"{name}_0_conv")
      shortcut = self._bn(shortcut, train, f"{name}_0_bn")
    else:
      shortcut = x
    y = self._conv(x, width, 1, stride, "VALID", f"{name}_1_conv")
    y = nn.relu(self._bn(y, train, f"{name}_1_bn"))
    y = self._conv(y, width, 3, 1, "SAME", f"{name}_2_conv")
    y = nn.relu(self._bn(y, train, f"{name}_2_bn"))
    y = self._conv(y, 4 * width, 1, 1, "VALID", f"{name}_3_conv")
    y = self._bn(y, train, f"{name}_3_bn", zero_scale=self.zero_init_residual)
    return nn.relu(shortcut + y)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.astype(self.dtype)
    # ZeroPadding2D(3) + VALID conv, written as the conv's own padding: same
    # arithmetic, one less copy of the input.
    x = self._conv(x, self.stem_width, 7, 2, ((3, 3), (3, 3)), "conv1_conv")
    x = nn.relu(self._bn(x, train, "conv1_bn"))
    # ZeroPadding2D(1) then a VALID max-pool: zeros, not -inf, as in Keras
    # (identical after the ReLU, but kept literal).
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = self._block(x, width, stride, projection=block == 0, train=train,
                        name=f"conv{stage + 2}_block{block + 1}")
    # Pool in float32 so bfloat16 runs hand the head full-precision features.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class _Head(nn.Module):
  """Dropout -> [Dense + ReLU + dropout] * len(hidden_units) -> Dense."""
  num_classes: int
  hidden_units: Sequence[int]
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for i, units in enumerate(self.hidden_units):
      x = nn.Dense(units, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=_DENSE_INIT, name=f"hidden_{i}")(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=_LOGITS_INIT, name="logits")(x)
    return x.astype(jnp.float32)


class ResNet(nn.Module):
  """Keras-compatible ResNet v1 with a small classification head.

  `__call__(x, train=..., frozen_backbone=...)` returns float32 logits;
  `features(x, train=...)` the pooled backbone features (use it with
  `model.apply(variables, x, train=False, method=ResNet.features)`).

  With `train=True` BatchNorm uses batch statistics (apply with
  `mutable=['batch_stats']`) and dropout needs a 'dropout' rng.
  `frozen_backbone=True` keeps the backbone's BatchNorm on its running
  statistics even in training, so a frozen backbone is frozen entirely: its
  params are masked by the optimiser and its statistics are not updated.
  """
  stage_sizes: Sequence[int]
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  num_classes: int = 10
  hidden_units: Sequence[int] = ()
  dropout_rate: float = 0.5
  bn_momentum: float = 0.99
  bn_epsilon: float = 1.001e-5
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  # Some convolutions as matrix products (see _Backbone._conv): same
  # parameters, same sums in another order; a speed choice per backend.
  use_conv_as_dot: bool = True

  def setup(self) -> None:
    self.backbone = _Backbone(
        stage_sizes=tuple(self.stage_sizes), widths=tuple(self.widths),
        stem_width=self.stem_width, bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon, zero_init_residual=self.zero_init_residual,
        dtype=self.dtype, use_conv_as_dot=self.use_conv_as_dot)
    self.head = _Head(num_classes=self.num_classes,
                      hidden_units=tuple(self.hidden_units),
                      dropout_rate=self.dropout_rate, dtype=self.dtype)

  def __call__(self, x: jax.Array, *, train: bool,
               frozen_backbone: bool = False) -> jax.Array:
    features = self.backbone(x, train=train and not frozen_backbone)
    return self.head(features, train=train)

  def features(self, x: jax.Array, *, train: bool) -> jax.Array:
    return self.backbone(x, train=train)


MODELS: dict[str, tuple[int, ...]] = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    # One block per stage, narrow: the real code path, small enough for tests
    # and smoke runs on a laptop CPU.
    "resnet_tiny": (1, 1, 1, 1),
}
_NARROW: dict[str, dict[str, Any]] = {
    "resnet_tiny": {"widths": (8, 16, 32, 64), "stem_width": 16},
}
# Compute dtypes by config name; parameters always stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model(name: str, *, num_classes: int = 10, dtype: str = "float32",
                 hidden_units: Sequence[int] = (), dropout_rate: float = 0.5,
                 bn_momentum: float = 0.99,
                 zero_init_residual: bool = False,
                 use_conv_as_dot: bool = True) -> ResNet:
  """The ResNet `name` (a key of MODELS) computing in `dtype` (of DTYPES)."""
  return ResNet(stage_sizes=MODELS[name], num_classes=num_classes,
                hidden_units=tuple(hidden_units), dropout_rate=dropout_rate,
                bn_momentum=bn_momentum, zero_init_residual=zero_init_residual,
                dtype=DTYPES[dtype], use_conv_as_dot=use_conv_as_dot,
                **_NARROW.get(name, {}))


# conv_as_dot settings (config.conv_as_dot); "auto" uses it on the backends
# where it was measured faster (docs/benchmarking.md).
CONV_AS_DOT_SETTINGS = ("auto", "always", "never")
CONV_AS_DOT_BACKENDS = ("cpu", "gpu", "tpu")


def conv_as_dot_on(setting: str, backend: str) -> bool:
  """Whether `setting` (of CONV_AS_DOT_SETTINGS) applies conv_as_dot on
  `backend` (jax.default_backend())."""
  if setting == "auto":
    return backend in CONV_AS_DOT_BACKENDS
  return setting == "always"


def count_params(variables: Mapping[str, Any]) -> dict[str, int]:
  """Counts elements of 'params' and 'batch_stats'.

  Works on real arrays and on `jax.eval_shape` output alike, so sizes can be
  checked before anything is allocated.
  """
  def total(tree: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
  return {"trainable": total(variables.get("params", {})),
          "batch_stats": total(variables.get("batch_stats", {}))}
