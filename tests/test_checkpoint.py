"""Checkpoints: the best one survives restarts, damage is caught on restore."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnist_resnet.training import checkpoint
from mnist_resnet.workdir.rundir import RunDirError

ABSTRACT = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32),
            "b": jax.ShapeDtypeStruct((64,), jnp.float32)}


def state(step: int) -> dict:
  key = jax.random.key(step)
  return {"w": jax.random.normal(key, (64, 64)), "b": jnp.full((64,), step,
                                                               jnp.float32)}


def open_checkpointer(directory, **kwargs) -> checkpoint.Checkpointer:
  kwargs.setdefault("max_to_keep", 1)
  return checkpoint.Checkpointer(directory, async_save=False, **kwargs)


def save_all(ckpt, accuracies: dict[int, float | None]) -> None:
  for step, accuracy in accuracies.items():
    ckpt.save(step, state(step), meta={"step": step},
              metrics=None if accuracy is None else
              {checkpoint.BEST_METRIC: accuracy})
  ckpt.wait_until_finished()


def test_best_checkpoint_survives_a_restart(tmp_path):
  """Saves 1, 2, 3 at validation accuracy 0.9, 0.5, 0.4 keeping one recent:
  1 (best) and 3 (latest) stay. After a restart and another save, 1 is still
  the best and still there (its metrics were written with it)."""
  ckpt = open_checkpointer(tmp_path, keep_best=True)
  save_all(ckpt, {1: 0.9, 2: 0.5, 3: 0.4})
  assert ckpt.all_steps() == [1, 3] and ckpt.best_step() == 1
  ckpt.close()

  ckpt = open_checkpointer(tmp_path, keep_best=True)
  assert ckpt.best_step() == 1
  save_all(ckpt, {4: 0.3})
  assert ckpt.all_steps() == [1, 4] and ckpt.best_step() == 1
  # A save without metrics (a preemption) never displaces the best.
  save_all(ckpt, {5: None})
  assert ckpt.all_steps() == [1, 5] and ckpt.best_step() == 1
  save_all(ckpt, {6: 0.95})
  assert ckpt.all_steps() == [6] and ckpt.best_step() == 6
  ckpt.close()


def test_without_validation_there_is_no_best(tmp_path):
  ckpt = open_checkpointer(tmp_path, max_to_keep=2)
  save_all(ckpt, {1: None, 2: None, 3: None})
  assert ckpt.all_steps() == [2, 3] and ckpt.best_step() is None
  ckpt.close()


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The files holding array bytes (orbax's OCDBT data), largest first."""
  files = [p for p in (step_dir / "state").rglob("*")
           if p.is_file() and p.parent.name == "d"]
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _scramble(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  rng = np.random.default_rng(0)
  middle = len(data) // 2
  data[middle:middle + 64] = rng.integers(0, 256, 64, np.uint8).tobytes()
  path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda d: [p.write_bytes(p.read_bytes()[:10])
                            for p in _data_files(d)],
    "zeroed": lambda d: [p.write_bytes(bytes(p.stat().st_size))
                         for p in _data_files(d)],
    "random bytes": lambda d: [_scramble(p) for p in _data_files(d)],
    "metadata deleted": lambda d: (d / "state" / "_METADATA").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_is_set_aside_and_the_one_before_used(
    tmp_path, damage):
  ckpt = open_checkpointer(tmp_path / "checkpoints", max_to_keep=3)
  save_all(ckpt, {1: None, 2: None})
  DAMAGE[damage](tmp_path / "checkpoints" / "2")
  aside = tmp_path / "set_aside"
  restored, step = ckpt.restore_latest_good(ABSTRACT, aside)
  assert step == 1
  np.testing.assert_array_equal(restored["w"], state(1)["w"])
  # Moved, never deleted; orbax no longer sees it.
  assert (aside / "2.damaged" / "state").is_dir()
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_all_checkpoints_damaged_is_one_line(tmp_path):
  ckpt = open_checkpointer(tmp_path / "checkpoints", max_to_keep=3)
  save_all(ckpt, {1: None, 2: None})
  for step in (1, 2):
    DAMAGE["zeroed"](tmp_path / "checkpoints" / str(step))
  with pytest.raises(RunDirError, match=r"every checkpoint in .* is damaged "
                     r"\(steps 2, 1, moved to .*set_aside\)") as e:
    ckpt.restore_latest_good(ABSTRACT, tmp_path / "set_aside")
  assert "\n" not in str(e.value)
  assert sorted(p.name for p in (tmp_path / "set_aside").iterdir()) == [
      "1.damaged", "2.damaged"]
  ckpt.close()


def test_empty_directory_restores_nothing(tmp_path):
  ckpt = open_checkpointer(tmp_path / "checkpoints")
  assert ckpt.restore_latest_good(ABSTRACT, tmp_path / "set_aside") is None
  ckpt.close()


def test_state_sha256_sees_every_bit():
  a = state(1)
  b = dict(a, b=a["b"].at[3].set(np.nextafter(np.float32(1), np.float32(2))))
  assert checkpoint.state_sha256(a) == checkpoint.state_sha256(state(1))
  assert checkpoint.state_sha256(a) != checkpoint.state_sha256(b)


def test_after_all_were_damaged_a_rerun_does_not_start_over(tmp_path):
  """A retry loop must not turn "every checkpoint is damaged" into a silent
  restart from step 0."""
  ckpt = open_checkpointer(tmp_path / "checkpoints", max_to_keep=3)
  save_all(ckpt, {1: None})
  DAMAGE["zeroed"](tmp_path / "checkpoints" / "1")
  with pytest.raises(RunDirError, match="every checkpoint"):
    ckpt.restore_latest_good(ABSTRACT, tmp_path / "set_aside")
  ckpt.close()
  ckpt = open_checkpointer(tmp_path / "checkpoints", max_to_keep=3)
  with pytest.raises(RunDirError, match=r"holds no checkpoint and .* holds "
                     "damaged ones"):
    ckpt.restore_latest_good(ABSTRACT, tmp_path / "set_aside")
  ckpt.close()


def test_a_step_set_aside_twice_keeps_both(tmp_path):
  """The same divergence on a retry sets the same step aside again."""
  aside = tmp_path / "set_aside"
  ckpt = open_checkpointer(tmp_path / "checkpoints", max_to_keep=3)
  moved = []
  for _ in range(2):
    save_all(ckpt, {2: None})
    moved.append(ckpt.set_aside(2, aside, "diverged").name)
  assert moved == ["2.diverged", "2.diverged.2"]
  assert sorted(p.name for p in aside.iterdir()) == moved
  assert ckpt.all_steps() == []
  ckpt.close()
