"""A trained model, read back from a run's workdir onto the devices present.

The tools that use a model after training (evaluate, predict, export) need
nothing but the workdir: its `config.json` says how the model was built and
how its input is prepared, and its checkpoints hold the weights. The
workdir is only read (a run may still be writing it), and a checkpoint
written on any topology restores onto this one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnist_resnet.core import parallel
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.data import mnist
from mnist_resnet.model import preprocess
from mnist_resnet.model import resnet
from mnist_resnet.training import program as program_lib
from mnist_resnet.training import steps
from mnist_resnet.workdir import checkpoints as checkpoint_lib
from mnist_resnet.workdir.rundir import RunDirError
from mnist_resnet.workdir.workdir import Workdir

# Examples per device call when predicting many images.
PREDICT_BATCH_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """The evaluation variables of one checkpoint (the EMA pair when the run
  kept one) and how to turn uint8 digits into the model's input."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  model: resnet.ResNet
  model_input: preprocess.ModelInput
  params: Any
  batch_stats: Any
  mesh: jax.sharding.Mesh

  def logits(self, images: jax.Array) -> jax.Array:
    """uint8 [B, 28, 28] -> float32 logits [B, 10]; traceable (jit, export)."""
    x = self.model_input.for_eval(images)
    out = self.model.apply(
        {"params": self.params, "batch_stats": self.batch_stats}, x,
        train=False)
    return out.astype(jnp.float32)

  @functools.cached_property
  def _logits_jit(self):
    # Replicated output: every process gets every row, multi-host too.
    return jax.jit(self.logits,
                   in_shardings=parallel.batch_sharding(self.mesh),
                   out_shardings=parallel.replicated(self.mesh))

  def predict_logits(self, images: np.ndarray,
                     batch_size: int = PREDICT_BATCH_SIZE) -> np.ndarray:
    """Logits of every image of a host uint8 [N, 28, 28] array, float32
    [N, 10]. Batches are split over every device; every process must pass
    the same images."""
    images = np.asarray(images, np.uint8)
    if images.ndim != 3 or images.shape[1:] != mnist.IMAGE_SHAPE:
      raise ValueError(f"images must be uint8 [N, 28, 28], got "
                       f"{images.shape}")
    devices = self.mesh.devices.size
    rows = min(batch_size, max(len(images), 1))
    rows = -(-rows // devices) * devices  # Whole rows per device.
    sharding = parallel.batch_sharding(self.mesh)
    out = []
    for start in range(0, len(images), rows):
      chunk = images[start:start + rows]
      padded = np.zeros((rows, *mnist.IMAGE_SHAPE), np.uint8)
      padded[:len(chunk)] = chunk
      batch = jax.make_array_from_callback(padded.shape, sharding,
                                           lambda index: padded[index])
      out.append(np.asarray(self._logits_jit(batch))[:len(chunk)])
    if not out:
      return np.zeros((0, mnist.NUM_CLASSES), np.float32)
    return np.concatenate(out)


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a workdir's run was started with (its config.json)."""
  run = Workdir(workdir)
  saved = run.saved_config()
  if saved is None:
    if not run.path.exists():
      raise RunDirError(f"{workdir}: no such workdir")
    raise RunDirError(f"{run.config_file} is missing: {workdir} "
                      "holds no training run (train.py writes it when a run "
                      "starts)")
  # JSON has no tuples; the config's sequences (hidden_units) are tuples.
  return ml_collections.ConfigDict(
      {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def parse_step(which: str | int) -> str | int:
  """--step's value: 'latest', 'best' or a step number (an int); anything
  else is a ConfigError, before anything is read."""
  text = str(which).strip()
  if text in ("latest", "best"):
    return text
  if not text.isdigit():
    raise ConfigError(f"--step={which!r}: must be latest, best or a step "
                      "number")
  return int(text)


def resolve_step(ckpt: checkpoint_lib.Checkpointer, which: str | int,
                 config: ml_collections.ConfigDict) -> int:
  """'latest', 'best' or a step number -> a step that has a checkpoint."""
  which = parse_step(which)
  steps_saved = sorted(ckpt.all_steps())
  if not steps_saved:
    raise RunDirError(f"{ckpt.directory} holds no checkpoint")
  if which == "latest":
    return steps_saved[-1]
  if which == "best":
    best = ckpt.best_step()
    if best is None:
      raise RunDirError(
          f"{ckpt.directory} has no best checkpoint: the run held out no "
          f"validation split (validation_examples="
          f"{config.get('validation_examples', 0)}); use --step=latest or a "
          "step number")
    return best
  step = which
  if step not in steps_saved:
    raise RunDirError(f"{ckpt.directory} holds no checkpoint of step {step}; "
                      f"it holds steps {', '.join(map(str, steps_saved))}")
  return step


def load(workdir: str | os.PathLike, step: str | int = "latest"
         ) -> TrainedModel:
  """The model of checkpoint `step` ('latest', 'best' or a number) of the
  run in `workdir`, on every device present. Builds the model and the
  shapes of what it restores, never a train step."""
  workdir = str(workdir)
  config = read_config(workdir)
  ckpt = Workdir(workdir).open_checkpointer(
      max_to_keep=max(1, int(config.max_checkpoints_to_keep)),
      keep_best=int(config.validation_examples) > 0, read_only=True)
  mesh = parallel.create_mesh()
  model = program_lib.create_model(config)
  try:
    chosen = resolve_step(ckpt, step, config)
    try:
      params, batch_stats = _restore_eval_variables(ckpt, chosen, config,
                                                    model, mesh)
    except checkpoint_lib.DamagedCheckpoint as e:
      raise RunDirError(f"{ckpt.directory}/{chosen} cannot be used: "
                        f"{e.reason}") from None
  finally:
    ckpt.close()
  return TrainedModel(workdir=workdir, step=chosen, config=config,
                      model=model, model_input=program_lib.model_input(config),
                      params=params, batch_stats=batch_stats, mesh=mesh)


def _restore_eval_variables(ckpt: checkpoint_lib.Checkpointer, step: int,
                            config: ml_collections.ConfigDict,
                            model: resnet.ResNet, mesh: jax.sharding.Mesh
                            ) -> tuple[Any, Any]:
  """(params, batch_stats) evaluation uses, checked against their digests:
  only the EMA pair when the run kept one, else the live pair; never the
  optimizer state."""
  init_variables = program_lib.variables_initializer(config, model, mesh)
  keep_ema = config.ema_decay > 0
  if ckpt.item_digests(step) is None:
    # Written before per-item digests: only a whole restore can be checked
    # (against the state's sha256), and its target needs the optimizer.
    train_examples = mnist.TRAIN_EXAMPLES - int(config.validation_examples)
    _, tx, groups = program_lib.create_optimizer(
        config, program_lib.total_train_steps(config, train_examples))
    target = program_lib.abstract_state(mesh, init_variables, tx, groups,
                                        keep_ema=keep_ema)
    return steps.eval_variables(ckpt.restore(step, target))
  shapes = jax.eval_shape(init_variables)
  rep = parallel.replicated(mesh)
  pair = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
      {"params": shapes["params"], "batch_stats": shapes["batch_stats"]})
  if keep_ema:
    restored = ckpt.restore_items(step, {"ema": pair})["ema"]
  else:
    restored = ckpt.restore_items(step, pair)
  return restored["params"], restored["batch_stats"]
