"""The model's FLOP count (flops.py): by hand, against the traced program,
and against XLA's cost analysis of the benchmark's train step."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import benchmark as benchmark_config
from mnist_resnet.commands import bench_record
from mnist_resnet.data import mnist
from mnist_resnet.model import flops
from mnist_resnet.model import resnet
from mnist_resnet.training import program as program_lib


def _resnet_forward_macs(size: int, stage_sizes: Sequence[int],
                         widths: Sequence[int], stem: int, classes: int,
                         stride_on_3x3: bool = False) -> int:
  """Multiply-accumulates of one forward pass, from the architecture alone:
  7x7/2 stem (padding 3), zero-pad 1 + 3x3/2 max-pool, bottlenecks
  1x1 -> 3x3 -> 1x1 (x4) with a projection in each stage's first block,
  global pool, dense. Keras's ResNet v1 strides the first 1x1;
  torchvision's v1.5 (stride_on_3x3) the 3x3."""
  side = -(-size // 2)
  macs = side * side * 7 * 7 * 3 * stem
  side = (side + 2 - 3) // 2 + 1
  cin = stem
  for stage, (blocks, width) in enumerate(zip(stage_sizes, widths)):
    for block in range(blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      out = -(-side // stride)
      if block == 0:
        macs += out * out * cin * 4 * width                # Projection.
      first = side if stride_on_3x3 else out
      macs += first * first * cin * width                  # 1x1 reduce.
      macs += out * out * 9 * width * width                # 3x3.
      macs += out * out * width * 4 * width                # 1x1 expand.
      side, cin = out, 4 * width
  return macs + cin * classes


def _resnet50_macs(size: int, **kw) -> int:
  kw.setdefault("classes", 10)
  return _resnet_forward_macs(size, (3, 4, 6, 3), (64, 128, 256, 512), 64,
                              **kw)


class _Tiny(nn.Module):
  """3x3 conv 8x8x3 -> 16, grouped strided 3x3 conv 16 -> 32, dense -> 10."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    x = nn.Conv(16, (3, 3), padding="SAME", name="conv_a")(x)
    x = nn.Conv(32, (3, 3), strides=(2, 2), padding="SAME",
                feature_group_count=4, name="conv_b")(x)
    return nn.Dense(10, name="logits")(jnp.mean(x, axis=(1, 2)))


# Hand-computed: outputs x taps x input channels per group.
_TINY_MACS = {
    "conv_a": 8 * 8 * 16 * (3 * 3) * 3,        # 27,648
    "conv_b": 4 * 4 * 32 * (3 * 3) * (16 // 4),  # 18,432
    "logits": 32 * 10,                          # 320
}


def test_hand_counted_small_model():
  layers = flops.model_layers(_Tiny(), 8)
  assert [(l.path, l.kind, l.flops) for l in layers] == [
      (("conv_a",), "conv", 2 * 27_648),
      (("conv_b",), "conv", 2 * 18_432),
      (("logits",), "dense", 2 * 320)]
  assert layers[0].output_shape == (8, 8, 16)
  assert (layers[1].output_shape, layers[1].groups) == ((4, 4, 32), 4)
  forward = 2 * sum(_TINY_MACS.values())
  assert flops.forward_flops_per_example(layers) == forward == 92_800
  assert flops.train_flops_per_example(layers) == 3 * forward
  # The traced program's convolutions (XLA's own, grouped) agree.
  model = _Tiny()
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros(x.shape), train=False))
  assert flops.jaxpr_matmul_flops(
      lambda v, x: model.apply(v, x, train=False), variables, x) == forward


def test_frozen_layers_count_forward_only():
  layers = flops.model_layers(resnet.create_model("resnet_tiny"), 32)
  head = sum(l.flops for l in layers if l.group == "head")
  backbone = sum(l.flops for l in layers if l.group == "backbone")
  assert head and backbone and {l.group for l in layers} == {"backbone",
                                                             "head"}
  assert flops.train_flops_per_example(layers, ("head",)) == (
      backbone + 3 * head)
  assert flops.train_flops_per_example(layers, ("backbone", "head")) == (
      3 * (backbone + head))


def test_unknown_layer_type_is_an_error():
  class WithEinsum(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
      x = nn.Conv(4, (1, 1), name="conv")(x)
      return nn.Einsum((4, 5), "bhwc,cd->bhwd", name="mix")(x)

  with pytest.raises(ValueError, match="unknown type: mix"):
    flops.model_layers(WithEinsum(), 4)


@pytest.mark.parametrize("name, size", [
    ("resnet50", 32), ("resnet50", 224), ("resnet_tiny", 28),
    ("resnet_tiny", 64)])
def test_model_count_matches_the_architecture(name, size):
  layers = flops.model_layers(resnet.create_model(name), size)
  if name == "resnet50":
    macs = _resnet50_macs(size)
    assert len(layers) == 53 + 1  # 53 convolutions, the dense head.
  else:
    macs = _resnet_forward_macs(size, (1, 1, 1, 1), (8, 16, 32, 64), 16, 10)
  assert flops.forward_flops_per_example(layers) == 2 * macs


def test_resnet50_224_reference():
  # Keras's ResNet50 (v1: the stride on the first 1x1) with a 10-class
  # head: 3.856 GMAC forward per image; training 23.1 GFLOP per image.
  layers = flops.model_layers(resnet.create_model("resnet50"), 224)
  forward = flops.forward_flops_per_example(layers)
  assert forward == 2 * 3_855_945_728
  assert flops.train_flops_per_example(layers) == 6 * 3_855_945_728
  # The widely quoted 4.09 GMAC (fvcore, torchvision) is ResNet50 v1.5 with
  # a 1000-class head: the same formula with the stride on the 3x3.
  v15 = _resnet50_macs(224, classes=1000, stride_on_3x3=True)
  assert v15 == pytest.approx(4.09e9, rel=1e-3)
  assert v15 - forward // 2 == 3 * 77_070_336 + 2048 * 990


@pytest.mark.parametrize("size", [32, 224])
def test_module_walk_matches_the_traced_program(size):
  """The jaxpr's convolutions and matrix products, counted independently:
  equal at 224x224; at 32x32 the 3x3 convolutions of the last stage run on
  1x1 maps as matrix products of their centre tap (models.conv_as_dot), so
  the program holds 8 of 9 taps fewer there."""
  model = resnet.create_model("resnet50")
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros(x.shape), train=False))
  traced = flops.jaxpr_matmul_flops(
      lambda v, x: model.apply(v, x, train=False), variables, x)
  counted = flops.forward_flops_per_example(flops.model_layers(model, size))
  dropped = 0 if size == 224 else 2 * 3 * 8 * 512 * 512
  assert traced == counted - dropped


@pytest.mark.parametrize("size", [32, 224])
def test_model_and_xla_counts_agree(size):
  """The benchmark's two counts of a ResNet50 train step, batch 128, within
  15%. XLA's is of the lowered step (compiling ResNet50 takes ~20 s here;
  the compiled count is within ~2% of the lowered one): it adds elementwise
  work and the optimizer, and leaves out convolution taps on padding and the
  stem's input gradient, so it is a little lower, most at 32x32 where the
  maps are small and padding is a larger share."""
  config = benchmark_config.get_config()
  config.model, config.image_size, config.batch_size = "resnet50", size, 128
  program = program_lib.build_program(config, mnist.TRAIN_EXAMPLES)
  model = bench_record.model_flops(program, config)
  xla = bench_record.xla_flops_per_step(bench_record.lower_step(program,
                                                              config))
  assert model["flops_per_step_model"] == 128 * 6 * _resnet50_macs(size)
  assert model["flops_per_example_train_model"] == 6 * _resnet50_macs(size)
  assert xla == pytest.approx(model["flops_per_step_model"], rel=0.15), (
      xla / model["flops_per_step_model"])
