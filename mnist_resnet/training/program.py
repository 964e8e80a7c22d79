"""What a config compiles to: the mesh, the model and its inputs, the
optimizer, and the jitted train step. Nothing here allocates until
`Program.initial_state` is called; `Program.compiled` compiles the step
ahead of time and checks it fits in memory before anything runs."""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mnist_resnet.core import parallel
from mnist_resnet.data import input_pipeline
from mnist_resnet.data import mnist
from mnist_resnet.data import order
from mnist_resnet.model import preprocess
from mnist_resnet.model import pretrained
from mnist_resnet.model import resnet
from mnist_resnet.training import memory
from mnist_resnet.training import optim
from mnist_resnet.training import steps


def total_train_steps(config: ml_collections.ConfigDict,
                      num_examples: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  spe = order.steps_per_epoch(num_examples, config.batch_size)
  return max(1, int(round(config.num_epochs * spe)))


@dataclasses.dataclass(frozen=True)
class Program:
  """What a config compiles to: mesh, model, optimizer and the jitted train
  step. Building one allocates nothing; `initial_state` does."""
  mesh: jax.sharding.Mesh
  model_name: str
  model: resnet.ResNet
  model_input: preprocess.ModelInput
  tx: optax.GradientTransformation
  groups: tuple[str, ...]
  keep_ema: bool
  total_steps: int
  train_step: Callable
  init_variables: Callable
  batch_size: int
  # Shapes, dtypes and shardings of the train step's second argument.
  train_inputs: Any

  def lower_train_step(self) -> jax.stages.Lowered:
    """The train step lowered on abstract arguments; nothing allocated."""
    return self.train_step.lower(self.abstract_state(), self.train_inputs)

  def compiled(self) -> Program:
    """This program with its train step compiled ahead of time, once the
    compiler says it fits in memory (memory.OutOfMemory, naming the batch,
    if not). The executable is the one the loop calls: nothing compiles
    twice."""
    executable = self.lower_train_step().compile()
    memory.check_fits(executable, what="the train step", key="batch_size",
                      batch_size=self.batch_size)
    return dataclasses.replace(self, train_step=executable)

  def abstract_state(self) -> steps.TrainState:
    """Shapes, dtypes and shardings of the train state; nothing allocated."""
    return abstract_state(self.mesh, self.init_variables, self.tx,
                          self.groups, self.keep_ema)

  def initial_state(self, weights: str | None = None) -> steps.TrainState:
    """Step 0: the backbone from `weights` (a Keras file or a converted
    directory, see `pretrained.load_backbone`) when given, else random."""
    variables = self.init_variables()
    if weights is not None:
      variables = parallel.replicate(
          pretrained.load_backbone(weights, variables, self.model_name),
          self.mesh)
    return jax.jit(lambda v: steps.new_state(v, self.tx, self.groups,
                                             self.keep_ema),
                   out_shardings=parallel.replicated(self.mesh))(variables)


def create_model(config: ml_collections.ConfigDict) -> resnet.ResNet:
  return resnet.create_model(
      config.model, num_classes=mnist.NUM_CLASSES, dtype=config.dtype,
      hidden_units=tuple(int(u) for u in config.hidden_units),
      dropout_rate=config.dropout_rate, bn_momentum=config.bn_momentum,
      zero_init_residual=config.zero_init_residual,
      use_conv_as_dot=resnet.conv_as_dot_on(config.conv_as_dot,
                                            jax.default_backend()))


def model_input(config: ml_collections.ConfigDict) -> preprocess.ModelInput:
  return preprocess.ModelInput(
      image_size=config.image_size, convention=config.input_convention,
      dtype=resnet.DTYPES[config.dtype], max_shift=int(config.aug_max_shift),
      max_rotation_deg=float(config.aug_max_rotation),
      max_scale=float(config.aug_max_scale))


def abstract_state(mesh: jax.sharding.Mesh, init_variables: Callable,
                   tx: optax.GradientTransformation, groups: tuple[str, ...],
                   keep_ema: bool) -> steps.TrainState:
  """Shapes, dtypes and shardings of a train state; nothing allocated."""
  rep = parallel.replicated(mesh)
  shapes = jax.eval_shape(lambda: steps.new_state(
      init_variables(), tx, groups, keep_ema))
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int
                     ) -> tuple[optax.Schedule, optax.GradientTransformation,
                                tuple[str, ...]]:
  """The learning-rate schedule, the optimizer and the trained groups."""
  schedule = optim.create_schedule(config.learning_rate, config.batch_size,
                                   config.warmup_steps, total_steps)
  groups = optim.trainable_groups(config.trainable)
  tx = optim.create_optimizer(
      schedule, optimizer=config.optimizer, groups=groups,
      weight_decay=config.weight_decay, momentum=config.momentum,
      nesterov=config.nesterov,
      backbone_lr_multiplier=config.backbone_lr_multiplier,
      grad_clip_norm=config.grad_clip_norm)
  return schedule, tx, groups


def variables_initializer(config: ml_collections.ConfigDict,
                          model: resnet.ResNet, mesh: jax.sharding.Mesh
                          ) -> Callable:
  """The jitted model.init of step 0, replicated over `mesh`."""
  size, dtype = config.image_size, resnet.DTYPES[config.dtype]
  init_key = jax.random.fold_in(jax.random.key(config.seed), 0)

  def init_variables():
    dummy = jnp.zeros((1, size, size, 3), dtype)
    return model.init({"params": init_key, "dropout": init_key}, dummy,
                      train=False)

  return jax.jit(init_variables, out_shardings=parallel.replicated(mesh))


def abstract_train_inputs(config: ml_collections.ConfigDict,
                          num_train_examples: int, mesh: jax.sharding.Mesh
                          ) -> dict[str, Any]:
  """The train step's second argument, abstract: tfdata, the global batch
  of uint8 images and int32 labels; device, the dataset on every device
  and an epoch's permutation (see input_pipeline.device_train_inputs)."""
  spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding)
  if config.input_pipeline == "device":
    rep, n = parallel.replicated(mesh), num_train_examples
    return {"data": {"image": spec((n, *mnist.IMAGE_SHAPE), jnp.uint8, rep),
                     "label": spec((n,), jnp.int32, rep)},
            "perm": spec((n,), jnp.int32, rep)}
  rows, sharding = int(config.batch_size), parallel.batch_sharding(mesh)
  return {"image": spec((rows, *mnist.IMAGE_SHAPE), jnp.uint8, sharding),
          "label": spec((rows,), jnp.int32, sharding)}


def build_program(config: ml_collections.ConfigDict,
                  num_train_examples: int) -> Program:
  mesh = parallel.create_mesh()
  model = create_model(config)
  total = total_train_steps(config, num_train_examples)
  schedule, tx, groups = create_optimizer(config, total)
  inputs = model_input(config)
  rep = parallel.replicated(mesh)
  step_fn = steps.make_train_step(model, tx, schedule, model_input=inputs,
                                  groups=groups,
                                  label_smoothing=config.label_smoothing,
                                  ema_decay=config.ema_decay, seed=config.seed)
  batch_sharding = parallel.batch_sharding(mesh)
  if config.input_pipeline == "device":
    # The step gathers its own batch from the dataset on the devices.
    step_fn = input_pipeline.with_device_batches(
        step_fn, global_batch_size=config.batch_size, mesh=mesh)
    batch_sharding = rep
  train_step = jax.jit(step_fn, in_shardings=(rep, batch_sharding),
                       out_shardings=(rep, rep), donate_argnums=(0,))
  return Program(mesh=mesh, model_name=config.model, model=model,
                 model_input=inputs, tx=tx, groups=groups,
                 keep_ema=config.ema_decay > 0, total_steps=total,
                 train_step=train_step,
                 init_variables=variables_initializer(config, model, mesh),
                 batch_size=int(config.batch_size),
                 train_inputs=abstract_train_inputs(
                     config, num_train_examples, mesh))
