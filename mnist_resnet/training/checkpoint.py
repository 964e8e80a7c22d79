"""Train-state checkpoints with orbax-checkpoint's CheckpointManager.

`CheckpointManager` (rather than the newer `ocp.v1` API) because it carries
what a long run needs in one place and is stable across the orbax versions the
requirements admit: asynchronous saves, preservation policies (the N most
recent plus, when a validation split is held out, the best by validation
accuracy), atomic commits (a step directory only appears once the save is
complete, so a save killed half-way is never restored), and multi-host
coordination (every process takes part).

Layout: workdir/checkpoints/<step>/{state,meta,metrics}; `state` holds the
train state pytree, `meta` a small JSON record with the state's sha256
(checked on restore: a committed checkpoint can still be damaged later), and
`metrics` the values the best checkpoint is chosen by (orbax reads them back
after a restart, so the best one survives it).
"""

from __future__ import annotations

import hashlib
from typing import Any
from typing import Callable
from typing import Mapping

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from mnist_resnet.workdir import rundir
from mnist_resnet.workdir.rundir import RunDirError

# The metric that picks the best checkpoint: never the test set's.
BEST_METRIC = "validation_accuracy"


def state_sha256(state: Any) -> str:
  """sha256 over every leaf's dtype, shape and bytes, in tree order."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(state)):
    leaf = np.asarray(leaf)
    digest.update(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


class Checkpointer:
  """Saves and restores the train state under `directory`."""

  def __init__(self, directory: epath.Path, *, max_to_keep: int,
               keep_best: bool = False, async_save: bool = True,
               read_only: bool = False):
    """`read_only`: for tools that read a workdir a run may still be
    writing: nothing is created, and a save in flight is left alone."""
    self.directory = epath.Path(directory)
    self.keep_best = keep_best
    policies = [ocp_policies.LatestN(n=max_to_keep)]
    best = {}
    if keep_best:
      metric: Callable[[Mapping[str, float]], float] = (
          lambda m: m[BEST_METRIC])
      policies.append(ocp_policies.BestN(
          get_metric_fn=metric, reverse=False, n=1,
          keep_checkpoints_without_metrics=False))
      # best_fn makes orbax write each save's metrics and read them back on
      # restart; without it BestN never sees a metric after a restart.
      best = dict(best_fn=metric, best_mode="max")
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        # Leftovers of a save killed before it committed are never restored;
        # removing them at start keeps the directory readable.
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
        **best,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"), options=options)

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best validation accuracy (None without keep_best)."""
    return self._manager.best_step() if self.keep_best else None

  def save(self, step: int, state: Any, *, meta: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> None:
    """Starts an asynchronous save of `state` at `step` (all processes).

    Returns once the arrays are copied off the device; writing goes on in
    the background. An earlier save still in flight is waited for first,
    and its errors are raised here.
    """
    meta = {**meta, "state_sha256": state_sha256(state)}
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta)),
        metrics=dict(metrics) if metrics is not None else None,
        force=True)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores `step` into the shapes, dtypes and shardings of the target
    and checks it against the digest saved with it.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings for
    the current mesh, so a checkpoint written on one topology restores on
    another. Raises `DamagedCheckpoint` when the checkpoint cannot be read or
    does not match its digest.
    """
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      # orbax and tensorstore raise many types for unreadable data.
      raise DamagedCheckpoint(step, _first_line(e)) from e
    state, meta = restored["state"], restored["meta"] or {}
    expected = meta.get("state_sha256")
    if expected is None:
      raise DamagedCheckpoint(step, "no state digest in its meta")
    if state_sha256(state) != expected:
      raise DamagedCheckpoint(step, "its state does not match the sha256 "
                                    "saved with it")
    return state

  def restore_latest_good(self, abstract_state: Any, set_aside: epath.Path
                          ) -> tuple[Any, int] | None:
    """The newest checkpoint that restores and verifies, with its step.

    A damaged one is moved under `set_aside` (never deleted: it may be worth
    a look), with a warning, and the one before is tried. None when the
    directory held no checkpoint; RunDirError when all were damaged.
    """
    tried = []
    if self.latest_step() is None and _damaged_in(set_aside):
      # Everything was damaged before: starting from scratch here would
      # silently discard the run (a retry loop would do just that).
      raise RunDirError(
          f"{self.directory} holds no checkpoint and {set_aside} holds "
          "damaged ones; restore them from a backup or use a new workdir")
    while (step := self.latest_step()) is not None:
      try:
        return self.restore(step, abstract_state), step
      except DamagedCheckpoint as e:
        moved = self.set_aside(step, set_aside, "damaged")
        logging.warning("%s/%d is damaged (%s); moved to %s, trying the one "
                        "before", self.directory, step, e.reason, moved)
        tried.append(step)
    if tried:
      raise RunDirError(
          f"every checkpoint in {self.directory} is damaged (steps "
          f"{', '.join(map(str, tried))}, moved to {set_aside}); use a new "
          "workdir or restore them from a backup")
    return None

  def set_aside(self, step: int, destination: epath.Path,
                why: str) -> epath.Path:
    """Moves checkpoint `step` to destination/<step>.<why> (numbered if
    taken), out of orbax's sight; process 0 moves, every process waits for
    it. Returns where it went."""
    moved = rundir.free_name(destination, f"{step}.{why}")
    if jax.process_index() == 0:
      rundir.move_tree(self.directory / str(step), moved)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self._manager.reload()
    return moved

  def wait_until_finished(self) -> None:
    """Blocks until every started save is on disk; raises its errors."""
    self._manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """True once every process has reached the preemption sync point."""
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    # The manager's start-up cleanup of unfinished saves runs in a thread
    # that close() does not wait for; a run that fails right after opening
    # would otherwise exit under it with a traceback.
    await_cleanup = getattr(self._manager,
                            "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self._manager.close()


def _damaged_in(set_aside: epath.Path) -> bool:
  return set_aside.exists() and any(
      ".damaged" in p.name for p in set_aside.iterdir())


class DamagedCheckpoint(Exception):
  """A committed checkpoint that cannot be read back as it was saved."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"checkpoint {step}: {reason}")
    self.step = step
    self.reason = reason


def _first_line(e: BaseException, limit: int = 240) -> str:
  """The start of an error's first line: tensorstore appends its whole spec."""
  text = str(e).strip()
  line = text.splitlines()[0].split(" [tensorstore_spec")[0] if text else (
      type(e).__name__)
  return line if len(line) <= limit else line[:limit] + "..."
