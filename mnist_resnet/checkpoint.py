"""Train-state checkpoints with orbax-checkpoint's CheckpointManager.

`CheckpointManager` (rather than the newer `ocp.v1` API) because it carries
what a long run needs in one place and is stable across the orbax versions the
requirements admit: asynchronous saves, preservation policies (the N most
recent plus the best by test accuracy), atomic commits (a step directory only
appears once the save is complete, so a save killed half-way is never
restored), and multi-host coordination (every process takes part).

Layout: workdir/checkpoints/<step>/{state,meta}; `state` holds the train state
pytree, `meta` a small JSON record (config, device count) for people reading
the directory.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

# The metric that picks the best checkpoint.
BEST_METRIC = "test_accuracy"


class Checkpointer:
  """Saves and restores the train state under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int,
               keep_best: bool = True, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    policies = [ocp_policies.LatestN(n=max_to_keep)]
    if keep_best:
      policies.append(ocp_policies.BestN(
          get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        # Leftovers of a save killed before it committed are never restored;
        # removing them at start keeps the directory readable.
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"), options=options)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def save(self, step: int, state: Any, *, meta: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> None:
    """Starts an asynchronous save of `state` at `step` (all processes).

    Returns once the arrays are copied off the device; writing to disk goes
    on in the background. An earlier save still in flight is waited for
    first, and its errors are raised here.
    """
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(dict(meta))),
        metrics=dict(metrics) if metrics is not None else None,
        force=True)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores `step` into the shapes, dtypes and shardings of the target.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings for
    the current mesh, so a checkpoint written on one topology restores on
    another.
    """
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

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

