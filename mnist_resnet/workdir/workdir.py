"""`Workdir`: one run's directory, local or gs://, and everything in it.

Every path of a workdir (checkpoints, config.json, lock.json, the metrics,
profiles, evaluation reports, results.json, set-aside checkpoints) is built
here and nowhere else; the layout is in docs/reference.md#the-workdir.
"""

from __future__ import annotations

import os
from typing import Any
from typing import Mapping

from absl import logging
from etils import epath

from mnist_resnet.core import files
from mnist_resnet.core.errors import one_line
from mnist_resnet.workdir import checkpoints as checkpoint_lib
from mnist_resnet.workdir import metrics as metrics_lib
from mnist_resnet.workdir import rundir
from mnist_resnet.workdir import runlock
from mnist_resnet.workdir.lock_holder import Lock
from mnist_resnet.workdir.rundir import RunDirError

# Config keys that change where or how a run runs, not what it computes: a
# resume may change them. Every other key changes the trajectory (seed,
# model, optimizer, data, ...), and a resume that changes one is refused.
# num_train_steps/num_epochs may grow: the run goes on from its checkpoint
# (the learning-rate schedule is stretched to the new length).
RESUMABLE_KEYS = frozenset({
    "data_dir", "download", "pretrained_weights",
    "log_every_steps", "eval_every_steps", "eval_batch_size",
    "checkpoint_every_steps", "max_checkpoints_to_keep", "profile_steps",
    "distributed", "coordinator_address", "num_processes", "process_id",
    "cluster_detection", "local_device_ids",
    "num_train_steps", "num_epochs",
    "input_pipeline", "compilation_cache_dir", "deterministic", "conv_as_dot",
    # Where the run ends and what it reports, not what it computes.
    "target_accuracy", "stop_at_target",
})

# Every config key added after a workdir could first be written, with the
# value that reproduces how runs behaved before it existed: an older
# config.json is read through it, so a new key never makes an older run
# refuse to resume or to load. A key added to configs/default.py is added
# here too (tests/test_workdir.py fails until it is).
ADDED_KEYS = {
    "distributed": False, "coordinator_address": "", "num_processes": -1,
    "process_id": -1,
    "validation_examples": 0,
    "compilation_cache_dir": "",
    "deterministic": False, "input_pipeline": "tfdata",
    "conv_as_dot": "auto",
    "target_accuracy": 0.0, "stop_at_target": False,
    "dataset": "mnist", "cluster_detection": "", "local_device_ids": "",
}



def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]
                   ) -> list[str]:
  """"key old -> new" for every key outside RESUMABLE_KEYS whose value
  differs: what would change the saved run's trajectory."""
  current = rundir.as_json(current)
  missing = object()
  return [
      f"{k} {saved.get(k, missing)!r} -> {current.get(k, missing)!r}"
      .replace(repr(missing), "(unset)")
      for k in sorted(set(saved) | set(current))
      if k not in RESUMABLE_KEYS
      and saved.get(k, missing) != current.get(k, missing)]

class Workdir:
  """One run's directory. `location` is a local path or a URL (gs://...);
  local paths are made absolute (orbax needs it)."""

  def __init__(self, location: str | os.PathLike):
    self.location = os.fspath(location)
    # Every command reads its workdir through here: a bucket name Cloud
    # Storage refuses is one line now, not a traceback from its first read.
    files.check_bucket_name(self.location, f"workdir {self.location}")
    if files.is_remote(self.location):
      files.quiet_storage_retries()
    self.path = rundir.workdir_path(self.location)
    self._lock: Lock | None = None
    self.config_source = str(self.config_file)
    # Opened once per run by open_checkpointer / open_metrics.
    self.checkpointer: checkpoint_lib.Checkpointer | None = None
    self.metrics: metrics_lib.Reporter | None = None

  def __str__(self) -> str:
    return self.location

  # --- Where each file lives ---------------------------------------------

  @property
  def checkpoint_dir(self) -> epath.Path:
    return self.path / "checkpoints"

  @property
  def set_aside_dir(self) -> epath.Path:
    return self.path / "set_aside"

  @property
  def profile_dir(self) -> epath.Path:
    return self.path / "profile"

  @property
  def config_file(self) -> epath.Path:
    return self.path / "config.json"

  @property
  def results_file(self) -> epath.Path:
    return self.path / "results.json"

  @property
  def metrics_file(self) -> epath.Path:
    return self.path / "metrics.jsonl"

  def eval_dir(self, step: int) -> epath.Path:
    """Where the evaluation report of checkpoint `step` goes by default."""
    return self.path / f"eval_{step}"

  # --- The saved config ---------------------------------------------------

  def saved_config(self) -> dict[str, Any] | None:
    """The config this workdir's run trains with, keys added since it was
    written at their ADDED_KEYS values; None where no run has started.

    config.json, unless it is missing or damaged: then the config saved with
    the newest checkpoint, the run's own record (a damaged config.json is
    kept under set_aside/). `config_source` names where it was read.
    """
    self.config_source = str(self.config_file)
    try:
      saved = rundir.read_json(self.config_file)
      if saved is not None and "model" not in saved:
        raise RunDirError(f"{self.config_file} is not a training config")
    except RunDirError as e:
      if self.config_file.is_dir():
        raise
      saved, damaged = None, e
    else:
      damaged = None
    if saved is None:
      saved = self._newest_checkpoint_config()
      if saved is None and damaged is not None:
        raise damaged
      if saved is not None:
        logging.warning("%s; using the config saved with %s",
                        damaged or f"{self.config_file} is missing",
                        self.config_source)
    return None if saved is None else {**ADDED_KEYS, **saved}

  def _newest_checkpoint_config(self) -> dict[str, Any] | None:
    """The config in the meta of the newest checkpoint whose meta reads."""
    ckpt = self.checkpointer or checkpoint_lib.Checkpointer(
        self.checkpoint_dir, max_to_keep=1, read_only=True)
    try:
      for step in sorted(ckpt.all_steps(), reverse=True):
        try:
          config = ckpt.read_meta(step).get("config")
        except checkpoint_lib.DamagedCheckpoint:
          continue
        if isinstance(config, dict) and "model" in config:
          self.config_source = f"{self.checkpoint_dir}/{step}"
          return config
      return None
    finally:
      if ckpt is not self.checkpointer:
        ckpt.close()

  def config_from_checkpoint(self) -> bool:
    """Whether the last `saved_config` came from a checkpoint, not
    config.json (which the run then writes again)."""
    return self.config_source != str(self.config_file)

  def check_resume_config(self, config: Mapping[str, Any]) -> None:
    """Refuses a config that would change the trajectory of the saved run."""
    saved = self.saved_config()
    if saved is None:
      return
    changed = config_changes(saved, config)
    if changed:
      raise RunDirError(
          f"{self.config_source} holds another run: {'; '.join(changed)}; "
          "rerun with the saved values or use a new workdir")

  def save_config(self, config: Mapping[str, Any]) -> None:
    rundir.write_atomic(self.config_file, rundir.to_json(config))

  def restore_config_file(self, config: Mapping[str, Any]) -> None:
    """config.json written again from the checkpoint's `config`; a damaged
    one is first copied to set_aside/config.json.damaged."""
    try:
      damaged = self.config_file.read_bytes()
    except FileNotFoundError:
      damaged = None
    if damaged is not None:
      rundir.write_atomic(
          rundir.free_name(self.set_aside_dir, "config.json.damaged"),
          damaged)
    self.save_config(config)

  # --- Results ------------------------------------------------------------

  def results(self) -> dict[str, Any] | None:
    """results.json, None if the run has not written it or it is damaged
    (the run then writes it again from its final checkpoint)."""
    try:
      return rundir.read_json(self.results_file)
    except RunDirError as e:
      if self.results_file.is_dir():
        raise
      logging.warning("%s; writing it again", e)
      return None

  def write_results(self, results: Mapping[str, Any]) -> epath.Path:
    rundir.write_atomic(self.results_file, rundir.to_json(results))
    return self.results_file

  # --- The lock -----------------------------------------------------------

  def take_lock(self) -> Lock:
    """Takes the workdir's lock (one run at a time) or raises RunDirError
    naming the holder; `release_lock` gives it back."""
    self._lock = runlock.acquire(self.location)
    return self._lock

  def check_lock(self) -> None:
    """Raises RunDirError once another run has taken the workdir over
    (nothing to check where this process holds no lock); the metrics then
    write nothing more."""
    if self._lock is None:
      return
    try:
      self._lock.check()
    except RunDirError:
      if self.metrics is not None:
        self.metrics.stop_writing()  # Never over the new holder's files.
      raise

  def release_lock(self) -> None:
    if self._lock is not None:
      self._lock.release()

  # --- What the run writes through -----------------------------------------

  def open_checkpointer(self, *, max_to_keep: int, keep_best: bool,
                        read_only: bool = False
                        ) -> checkpoint_lib.Checkpointer:
    """The run's checkpoints (`read_only` for tools that read a workdir a
    run may still be writing); `close` closes it."""
    if not read_only:
      rundir.check_is_directory(self.checkpoint_dir)
    self.checkpointer = checkpoint_lib.Checkpointer(
        self.checkpoint_dir, max_to_keep=max_to_keep, keep_best=keep_best,
        read_only=read_only)
    return self.checkpointer

  def open_metrics(self, *, writes: bool, total_steps: int,
                   start_step: int) -> metrics_lib.Reporter:
    """The run's scalars and images (metrics.jsonl, TensorBoard); only the
    process that `writes` writes files."""
    self.metrics = metrics_lib.Reporter(
        self.metrics_file, self.path, writes=writes, total_steps=total_steps,
        start_step=start_step, check=self.check_lock)
    return self.metrics

  def close(self) -> None:
    """Closes the metrics (written whole), then the checkpointer."""
    try:
      if self.metrics is not None:
        metrics, self.metrics = self.metrics, None
        metrics.close()
    finally:
      if self.checkpointer is not None:
        checkpointer, self.checkpointer = self.checkpointer, None
        checkpointer.close()

  def __exit__(self, exc_type, exc, traceback) -> None:
    """`close()` as an exit callback (`ExitStack.push`): with an error on its
    way out, failing to close (the same lost bucket again) is a warning, so
    the first error is the one reported."""
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      if exc is None:
        raise
      logging.warning("could not close the workdir after an earlier error: "
                      "%s", one_line(e, limit=300))
