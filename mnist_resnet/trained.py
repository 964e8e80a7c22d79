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

from mnist_resnet import checkpoint as checkpoint_lib
from mnist_resnet import mnist
from mnist_resnet import models
from mnist_resnet import parallel
from mnist_resnet import preprocess
from mnist_resnet import rundir
from mnist_resnet import steps
from mnist_resnet.rundir import RunDirError

# Examples per device call when predicting many images.
PREDICT_BATCH_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """The evaluation variables of one checkpoint (the EMA pair when the run
  kept one) and how to turn uint8 digits into the model's input."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  model: models.ResNet
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
  path = rundir.config_path(workdir)
  saved = rundir.read_json(path)
  if saved is None:
    if not rundir.workdir_path(workdir).exists():
      raise RunDirError(f"{workdir}: no such workdir")
    raise RunDirError(f"{path} is missing: {workdir} holds no training run "
                      "(train.py writes it when a run starts)")
  if not isinstance(saved, dict) or "model" not in saved:
    raise RunDirError(f"{path} is not a training config")
  # Keys added since the run started take their defaults (none changes
  # what a trained model computes).
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  for key, value in saved.items():
    if key in config and isinstance(config[key], tuple):
      value = tuple(value)  # JSON has no tuples.
    config[key] = value
  return config


def resolve_step(ckpt: checkpoint_lib.Checkpointer, which: str | int,
                 config: ml_collections.ConfigDict) -> int:
  """'latest', 'best' or a step number -> a step that has a checkpoint."""
  steps_saved = sorted(ckpt.all_steps())
  if not steps_saved:
    raise RunDirError(f"{ckpt.directory} holds no checkpoint")
  which = str(which).strip()
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
  try:
    step = int(which)
  except ValueError:
    raise RunDirError(f"--step={which!r}: must be latest, best or a step "
                      "number") from None
  if step not in steps_saved:
    raise RunDirError(f"{ckpt.directory} holds no checkpoint of step {step}; "
                      f"it holds steps {', '.join(map(str, steps_saved))}")
  return step


def load(workdir: str | os.PathLike, step: str | int = "latest"
         ) -> TrainedModel:
  """The model of checkpoint `step` ('latest', 'best' or a number) of the
  run in `workdir`, on every device present."""
  # Imported here: train imports the data pipelines, and tools that only
  # load a model should not pay for (or need) more than the model.
  from mnist_resnet import train  # pylint: disable=g-import-not-at-top
  workdir = str(workdir)
  config = read_config(workdir)
  ckpt = checkpoint_lib.Checkpointer(
      rundir.checkpoint_dir(workdir),
      max_to_keep=max(1, int(config.get("max_checkpoints_to_keep", 1))),
      keep_best=int(config.get("validation_examples", 0)) > 0,
      read_only=True)
  try:
    chosen = resolve_step(ckpt, step, config)
    train_examples = mnist.TRAIN_EXAMPLES - int(
        config.get("validation_examples", 0))
    program = train.build_program(config, train_examples)
    try:
      state = ckpt.restore(chosen, program.abstract_state())
    except checkpoint_lib.DamagedCheckpoint as e:
      raise RunDirError(f"{ckpt.directory}/{chosen} cannot be used: "
                        f"{e.reason}") from None
  finally:
    ckpt.close()
  params, batch_stats = steps.eval_variables(state)
  return TrainedModel(workdir=workdir, step=chosen, config=config,
                      model=program.model, model_input=program.model_input,
                      params=params, batch_stats=batch_stats,
                      mesh=program.mesh)
