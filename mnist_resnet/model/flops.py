"""FLOP counts: the model's, counted from its layers, and chips' dense peaks.

`model_flops` and `train_flops_per_example` count what the architecture
defines: every nn.Conv and nn.Dense call, seen under `jax.eval_shape` at its
real shapes, at 2 FLOPs per multiply-accumulate; training = 3 x forward for
a trained layer. MFU is computed from them and `peak_tflops`, as in MLPerf
and MaxText. `jaxpr_matmul_flops` counts the traced program instead, for the
tests. Conventions and figures: docs/benchmarking.md#flops-and-mfu.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Dense peak TFLOP/s of one chip, (bfloat16, float32), for `mfu`. float32 on
# NVIDIA is the TF32 tensor-core rate: XLA's default precision for float32
# convolutions and matmuls uses TF32 on Ampere and later. On TPU float32
# matmuls run as single bfloat16 passes by default, so both columns are the
# bfloat16 rate. Matched in order against the lower-cased device kind, so
# specific names come before the names they contain.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("h100 pcie", 756.0, 378.0),
    ("h100", 989.0, 495.0),
    ("h200", 989.0, 495.0),
    ("a100", 312.0, 156.0),
    ("tpu v4", 275.0, 275.0),
    ("tpu v5 lite", 197.0, 197.0),
    ("tpu v5e", 197.0, 197.0),
    ("tpu v5p", 459.0, 459.0),
    ("tpu v5", 459.0, 459.0),
    ("tpu v6 lite", 918.0, 918.0),
    ("tpu v6e", 918.0, 918.0),
    ("tpu7x", 2307.0, 2307.0),
)

# Training FLOPs per forward FLOP of a trained layer: forward + backward
# (activation gradients + weight gradients, each as costly as the forward).
TRAIN_FORWARD_MULTIPLE = 3


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The chip's dense peak for `dtype`, or None when it is not in the table
  (every CPU, and accelerators the table does not list)."""
  kind = device_kind.lower()
  for name, bf16, f32 in PEAK_TFLOPS:
    if name in kind:
      return bf16 if dtype == "bfloat16" else f32
  return None


@dataclasses.dataclass(frozen=True)
class Layer:
  """One convolution or dense layer call and its forward FLOPs per example."""
  path: tuple[str, ...]  # Module path, e.g. ('backbone', 'conv1_conv').
  kind: str  # 'conv' or 'dense'.
  input_shape: tuple[int, ...]  # Per example (batch axis dropped).
  output_shape: tuple[int, ...]
  kernel: tuple[int, ...]  # Spatial kernel size; () for dense.
  groups: int
  flops: int  # 2 x multiply-accumulates, per example, forward.

  @property
  def group(self) -> str:
    """The top-level parameter group ('backbone' or 'head')."""
    return self.path[0] if self.path else ""


def _layer(module: nn.Module, x: jax.Array, y: jax.Array,
           batch: int) -> Layer | None:
  path = tuple(module.scope.path) if module.scope is not None else ()
  if isinstance(module, nn.Conv):
    kernel = tuple(module.kernel_size)
    groups = int(module.feature_group_count)
    cin = x.shape[-1]
    macs = math.prod(y.shape) * math.prod(kernel) * (cin // groups)
    kind = "conv"
  elif isinstance(module, nn.Dense):
    kernel, groups = (), 1
    macs = math.prod(y.shape) * x.shape[-1]
    kind = "dense"
  else:
    return None
  if macs % batch:
    raise ValueError(f"{'/'.join(path)}: {macs} MACs over batch {batch}")
  return Layer(path=path, kind=kind, input_shape=tuple(x.shape[1:]),
               output_shape=tuple(y.shape[1:]), kernel=kernel, groups=groups,
               flops=2 * macs // batch)


def model_layers(model: nn.Module, image_size: int, channels: int = 3,
                 **call_kwargs: Any) -> list[Layer]:
  """Every convolution and dense layer the model applies to one
  image_size x image_size x channels input, in call order.

  Nothing is computed: the model is initialised under `jax.eval_shape`.
  Raises ValueError if a parameter named 'kernel' belongs to a module the
  count does not know (a layer type this function would miss).
  """
  call_kwargs.setdefault("train", False)
  batch = 2  # Not 1: a batch axis that cannot be confused with another.
  layers: list[Layer] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and args:
      layer = _layer(context.module, args[0], out, batch)
      if layer is not None:
        layers.append(layer)
    return out

  def init():
    x = jnp.zeros((batch, image_size, image_size, channels), jnp.float32)
    with nn.intercept_methods(interceptor):
      return model.init({"params": jax.random.key(0),
                         "dropout": jax.random.key(1)}, x, **call_kwargs)

  variables = jax.eval_shape(init)
  kernels = {tuple(str(getattr(k, "key", k)) for k in path[:-1])
             for path, _ in jax.tree_util.tree_leaves_with_path(
                 variables.get("params", {}))
             if str(getattr(path[-1], "key", path[-1])) == "kernel"}
  missed = kernels - {l.path for l in layers}
  if missed:
    raise ValueError("FLOPs not counted for layers of unknown type: "
                     + ", ".join("/".join(p) for p in sorted(missed)))
  return layers


def forward_flops_per_example(layers: Iterable[Layer]) -> int:
  return sum(l.flops for l in layers)


def train_flops_per_example(layers: Iterable[Layer],
                            trained_groups: Sequence[str] | None = None
                            ) -> int:
  """Forward + backward FLOPs of one training example: 3 x forward for the
  layers of `trained_groups` (all when None), 1 x forward for the others."""
  return sum(
      l.flops * (TRAIN_FORWARD_MULTIPLE
                 if trained_groups is None or l.group in trained_groups
                 else 1)
      for l in layers)


def model_flops(model: nn.Module, image_size: int, batch_size: int,
                trained_groups: Sequence[str] | None = None) -> dict[str, Any]:
  """The model's FLOPs for the benchmark's records: per example forward
  and train, and per global train step of `batch_size` examples."""
  layers = model_layers(model, image_size)
  train = train_flops_per_example(layers, trained_groups)
  return {
      "flops_per_example_forward_model": forward_flops_per_example(layers),
      "flops_per_example_train_model": train,
      "flops_per_step_model": train * int(batch_size),
  }


# --------------------------------------------------------------------------
# Cross-check: the traced program's convolutions and matrix products.


def _eqn_flops(eqn: Any) -> int:
  """2 x MACs of one conv_general_dilated or dot_general equation."""
  out = eqn.outvars[0].aval.shape
  if eqn.primitive.name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
    taps = math.prod(rhs[d] for d in spec[2:])
    return 2 * math.prod(out) * taps * rhs[spec[1]]
  if eqn.primitive.name == "dot_general":
    lhs = eqn.invars[0].aval.shape
    (contract, _), _ = eqn.params["dimension_numbers"]
    return 2 * math.prod(out) * math.prod(lhs[d] for d in contract)
  return 0


def _sub_jaxprs(eqn: Any) -> Iterable[Any]:
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def _jaxpr_flops(jaxpr: Any) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("while", "cond"):
      raise ValueError(f"jaxpr_matmul_flops: {eqn.primitive.name} not "
                       "supported (trip count or branch unknown)")
    inner = sum(_jaxpr_flops(j) for j in _sub_jaxprs(eqn))
    if eqn.primitive.name == "scan":
      inner *= int(eqn.params["length"])
    total += inner + _eqn_flops(eqn)
  return total


def jaxpr_matmul_flops(fn: Callable[..., Any], *args: Any) -> int:
  """2 x MACs of every convolution and matrix product in fn(*args)'s traced
  program, taps on padding included (args may be ShapeDtypeStructs)."""
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
