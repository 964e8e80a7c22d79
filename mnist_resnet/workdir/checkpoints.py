"""Train-state checkpoints with orbax-checkpoint's CheckpointManager.

Asynchronous saves; the N most recent kept, plus the best by validation
accuracy; atomic commits; restore checked against each item's digest
(`digest.py`), falling back to an older checkpoint; any topology. The layout
of workdir/checkpoints/<step>/ and why CheckpointManager rather than
`ocp.v1`: docs/reference.md#the-workdir.
"""

from __future__ import annotations

import asyncio
from concurrent import futures
import contextlib
import dataclasses
import hashlib
import statistics
import time
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Mapping

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from mnist_resnet.workdir import digest as digest_lib
from mnist_resnet.workdir import rundir
from mnist_resnet.workdir.rundir import RunDirError

# The metric that picks the best checkpoint: never the test set's.
BEST_METRIC = "validation_accuracy"
# Arrays uncompressed: on 2 CPU cores zstd saved 8% of a 377 MB ResNet50 state
# for +0.8 CPU-s (+50%) per save. Restores read either kind.
COMPRESS = False


def state_sha256(state: Any) -> str:
  """sha256 over every leaf's dtype, shape and bytes, in tree order: the
  digest of checkpoints written before `state_digests` (still verified)."""
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
    self._async = async_save
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
    self._state_handler = ocp.PyTreeCheckpointHandler(
        use_compression=COMPRESS)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        handler_registry=_handlers(self._state_handler))
    self._blocking: list[float] = []

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
    the background, and so does the digest of each top-level item, which
    the meta gets there. An earlier save still in flight is waited for
    first, and its errors are raised here.
    """
    start = time.perf_counter()
    items = digest_lib.top_level_items(state)
    pending = futures.Future()  # The digests, once dispatched.

    def full_meta() -> dict[str, Any]:
      # Runs in the background save: fetching waits for the devices there.
      return {**meta, "digest": digest_lib.ALGORITHM,
              "state_digests": pending.result().result()}

    try:
      if not self._async:  # A synchronous save writes the meta at once.
        _dispatch_into(pending, items)
      with self._gone_is_one_line():
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                meta=_DeferredJsonSave(full_meta)),
            metrics=dict(metrics) if metrics is not None else None,
            force=True)
      # After orbax's save, not before: on CPU its copy off the devices
      # would queue behind the checksum (measured +0.25 s per save).
      if not pending.done():
        _dispatch_into(pending, items)
    finally:
      if not pending.done():
        pending.set_exception(RuntimeError("the save failed"))
      self._blocking.append(time.perf_counter() - start)

  def warm_up(self, state: Any) -> None:
    """Compiles the digest for `state`'s structure now, before the loop, so
    the first save does not (2.6-4.2 s for the ResNet50 scratch state on a
    2-core CPU); the value is computed and dropped."""
    digest_lib.dispatch(digest_lib.top_level_items(state)).result()

  @property
  def blocking_seconds(self) -> list[float]:
    """How long each `save` call blocked its caller, in order."""
    return list(self._blocking)

  def median_blocking_seconds(self) -> tuple[float | None, int]:
    """(median of `blocking_seconds` or None, number of saves)."""
    times = self._blocking
    return (statistics.median(times) if times else None), len(times)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores `step` into the shapes, dtypes and shardings of the target
    and checks it against the digests saved with it.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings for
    the current mesh, so a checkpoint written on one topology restores on
    another. Raises `DamagedCheckpoint` when the checkpoint cannot be read or
    does not match its digests.
    """
    meta = self.read_meta(step)
    state = self._restore_state(step, abstract_state, partial=False)
    if "state_digests" in meta:
      _verify(step, meta, digest_lib.top_level_items(state))
    elif "state_sha256" in meta:
      if state_sha256(state) != meta["state_sha256"]:
        raise DamagedCheckpoint(step, "its state does not match the sha256 "
                                      "saved with it")
    else:
      raise DamagedCheckpoint(step, "no state digest in its meta")
    return state

  def item_digests(self, step: int) -> dict[str, str] | None:
    """The digest of each top-level item saved with `step`; None for a
    checkpoint written before they were (one sha256 of the whole state)."""
    meta = self.read_meta(step)
    if "state_digests" not in meta and "state_sha256" not in meta:
      raise DamagedCheckpoint(step, "no state digest in its meta")
    return meta.get("state_digests")

  def restore_items(self, step: int, targets: Mapping[str, Any]
                    ) -> dict[str, Any]:
    """Restores only the top-level items of the state named in `targets`
    (item name -> abstract pytree, as for `restore`) and checks each
    against its digest. Raises `DamagedCheckpoint` as `restore` does, also
    for a checkpoint without per-item digests (see `item_digests`)."""
    meta = self.read_meta(step)
    if "state_digests" not in meta:
      raise DamagedCheckpoint(step, "no per-item digests in its meta")
    restored = self._restore_state(step, dict(targets), partial=True)
    items = {name: restored[name] for name in targets}
    _verify(step, meta, items)
    return items

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON record saved with `step` (DamagedCheckpoint if unreadable)."""
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpoint(step, _first_line(e)) from e
    meta = restored["meta"]
    if not isinstance(meta, dict):
      raise DamagedCheckpoint(step, "its meta is not a JSON object")
    if meta.get("step", step) != step:
      # Renamed by hand: resuming would save over a later step's name.
      raise DamagedCheckpoint(step, f"it holds step {meta['step']}, not "
                                    f"{step}: its directory was renamed")
    return meta

  def _restore_state(self, step: int, target: Any, partial: bool) -> Any:
    try:
      # Without its tree metadata orbax would still read the arrays, taking
      # their layout from the target: a checkpoint missing files is damaged.
      self._state_handler.metadata(self.directory / str(step) / "state")
      return self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=target,
              restore_args=ocp.checkpoint_utils.construct_restore_args(
                  target),
              partial_restore=partial)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      # orbax and tensorstore raise many types for unreadable data.
      raise DamagedCheckpoint(step, _first_line(e)) from e

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
    with self._gone_is_one_line():
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _gone_is_one_line(self) -> Iterator[None]:
    """A save whose files went away while it was being written (the workdir
    deleted or moved mid-run) is a RunDirError, not orbax's traceback."""
    try:
      yield
    except FileNotFoundError as e:
      raise RunDirError(
          f"{e.filename or self.directory} disappeared while a checkpoint "
          "was being written (the workdir deleted or moved?); the run "
          "cannot go on") from None

  def reached_preemption(self, step: int) -> bool:
    """True once every process has reached the preemption sync point."""
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    # The manager's start-up cleanup of unfinished saves runs in a thread
    # that close() does not wait for; a run that fails right after opening
    # would otherwise exit under it with a traceback. A private orbax method
    # (orbax-checkpoint 0.12.8), skipped where it does not exist; no test
    # shows the traceback yet.
    await_cleanup = getattr(self._manager,
                            "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self._manager.close()


def _dispatch_into(pending: futures.Future, items: Mapping[str, Any]
                   ) -> None:
  """Starts the digests of `items` on the devices; `pending` gets them (or
  the error, which the background save then raises too)."""
  try:
    pending.set_result(digest_lib.dispatch(items))
  except BaseException as e:
    pending.set_exception(e)
    raise


def _verify(step: int, meta: Mapping[str, Any],
            items: Mapping[str, Any]) -> None:
  """Raises DamagedCheckpoint unless every item matches its saved digest."""
  if meta.get("digest") != digest_lib.ALGORITHM:
    raise DamagedCheckpoint(step, f"its digest {meta.get('digest')!r} is "
                                  f"not {digest_lib.ALGORITHM!r}")
  saved = meta["state_digests"]
  actual = digest_lib.item_digests(items)
  wrong = sorted(k for k in items if saved.get(k) != actual[k])
  if wrong:
    raise DamagedCheckpoint(step, f"its {', '.join(wrong)} do not match the "
                                  "digests saved with them")


class _DeferredJsonHandler(ocp.JsonCheckpointHandler):
  """A JSON item whose value is computed by the background save: the
  digests are fetched there, not on the caller's thread."""

  # Overrides orbax's private `_save_fn` (checked with orbax-checkpoint
  # 0.12.8, the requirements' floor): fetching the digests on the caller's
  # thread blocked each save 0.3-0.4 s more (docs/benchmarking.md). Shown by
  # tests/test_checkpoint.py::
  # test_an_asynchronous_save_records_its_digests_and_blocking.

  async def _save_fn(self, x, directory):
    if callable(x):
      x = await asyncio.to_thread(x)
    await super()._save_fn(x, directory)


@dataclasses.dataclass
class _DeferredJsonSave(ocp.args.CheckpointArgs):
  item: Callable[[], Mapping[str, Any]]


def _handlers(state: ocp.PyTreeCheckpointHandler
              ) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """state: a pytree; meta: JSON that may be computed in the background."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.PyTreeSave, state)
  registry.add("state", ocp.args.PyTreeRestore, state)
  meta = _DeferredJsonHandler()
  registry.add("meta", _DeferredJsonSave, meta)
  registry.add("meta", ocp.args.JsonRestore, meta)
  return registry


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
