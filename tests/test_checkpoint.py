"""Checkpoints: the best one survives restarts, damage is caught on restore,
and the digests that catch it see every bit."""

from __future__ import annotations

import collections.abc
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT
from mnist_resnet.workdir import checkpoints as checkpoint
from mnist_resnet.workdir import digest
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


def _resave_changed(step_dir: pathlib.Path) -> None:
  """The state item written again by orbax itself, one value changed: a
  valid checkpoint that orbax restores without complaint, which only the
  digest saved in the meta (left as it was) can tell apart."""
  changed = state(2)
  changed["b"] = changed["b"].at[0].add(1.0)
  shutil.rmtree(step_dir / "state")
  ocp.PyTreeCheckpointer().save(step_dir / "state", changed)


DAMAGE = {
    "truncated": lambda d: [p.write_bytes(p.read_bytes()[:10])
                            for p in _data_files(d)],
    "zeroed": lambda d: [p.write_bytes(bytes(p.stat().st_size))
                         for p in _data_files(d)],
    "random bytes": lambda d: [_scramble(p) for p in _data_files(d)],
    "metadata deleted": lambda d: (d / "state" / "_METADATA").unlink(),
    "re-saved with another value": _resave_changed,
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


# --- The digests ------------------------------------------------------------

# Sizes on both sides of digest.SMALL: summed end to end, and one by one.
SIZES = (37, digest.SMALL + 3)
DTYPES = ("float32", "bfloat16", "float16", "int32", "uint8", "int8", "bool")


def _values(dtype: str, size: int) -> np.ndarray:
  rng = np.random.default_rng(size)
  if dtype == "bool":
    return rng.integers(0, 2, size).astype(bool)
  bits = np.dtype(jnp.dtype(dtype)).itemsize * 8
  raw = rng.integers(0, 2**bits, size, dtype=np.uint64)
  return raw.astype(f"uint{bits}").view(jnp.dtype(dtype))


def _flip(values: np.ndarray, index: int, bit: int) -> np.ndarray:
  flipped = values.copy()
  if values.dtype == bool:
    flipped[index] = not flipped[index]
  else:
    words = flipped.view(f"uint{values.dtype.itemsize * 8}")
    words[index] ^= words.dtype.type(1) << words.dtype.type(bit)
  return flipped


def _digest(tree) -> str:
  return digest.item_digests({"item": tree})["item"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_digest_sees_every_flipped_bit(dtype, size):
  """Every bit of the first, a middle and the last element, beside another
  leaf so the small leaves are summed end to end."""
  values = _values(dtype, size)
  other = jnp.arange(5, dtype=jnp.float32)
  original = _digest({"a": other, "x": jnp.asarray(values)})
  assert original == _digest({"a": other, "x": jnp.asarray(values.copy())})
  bits = 1 if dtype == "bool" else values.dtype.itemsize * 8
  seen = {original}
  for index in (0, size // 2, size - 1):
    for bit in range(bits):
      flipped = jnp.asarray(_flip(values, index, bit))
      seen.add(_digest({"a": other, "x": flipped}))
  assert len(seen) == 1 + 3 * bits


def test_the_digest_sees_64_bit_values():
  with jax.enable_x64(True):
    values = np.arange(7, dtype=np.int64) * 0x0123456789ABCDEF
    original = _digest({"x": jnp.asarray(values)})
    for bit in (0, 31, 32, 63):
      assert _digest({"x": jnp.asarray(_flip(values, 3, bit))}) != original


@pytest.mark.parametrize("size", SIZES)
def test_the_digest_sees_two_sign_flips(size):
  """Flips of the top bit cancel in a plain sum of words mod 2^32."""
  values = _values("float32", size)
  flipped = _flip(_flip(values, 1, 31), size - 2, 31)
  assert _digest({"x": jnp.asarray(values)}) != _digest(
      {"x": jnp.asarray(flipped)})


@pytest.mark.parametrize("size", SIZES)
def test_the_digest_sees_swapped_reshaped_and_retyped_leaves(size):
  a = jnp.asarray(_values("float32", size))
  b = jnp.asarray(_values("float32", size)[::-1].copy())
  original = _digest({"a": a, "b": b})
  assert _digest({"a": b, "b": a}) != original
  # The same bits under another shape, dtype or name.
  assert _digest({"a": a.reshape(1, -1), "b": b}) != original
  assert _digest({"a": jax.lax.bitcast_convert_type(a, jnp.int32),
                  "b": b}) != original
  assert _digest({"c": a, "b": b}) != original
  # Swapped within a leaf.
  swapped = np.asarray(a).copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  assert _digest({"a": jnp.asarray(swapped), "b": b}) != original


def test_the_digest_is_the_same_on_any_topology():
  """Sharded, replicated over 4 devices or on one: the same digests (a
  checkpoint restores onto another topology)."""
  script = textwrap.dedent("""
      import json
      import jax
      import numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from mnist_resnet.workdir import digest
      mesh = jax.make_mesh((4,), ("d",))
      rng = np.random.default_rng(0)
      tree = {"big": rng.normal(size=(digest.SMALL // 64, 128)),
              "small": rng.normal(size=(8, 6)), "n": np.arange(5)}
      tree = jax.tree.map(lambda x: x.astype(np.float32)
                          if x.dtype == np.float64 else x, tree)
      def place(spec):
        return {k: jax.device_put(v, NamedSharding(
            mesh, spec if k != "n" else P())) for k, v in tree.items()}
      out = [digest.item_digests({"i": t}) for t in (
          tree, place(P()), place(P("d")), jax.device_put(tree))]
      print(json.dumps(out))
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", script], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  digests = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len({d["i"] for d in digests}) == 1, digests


# --- Saves, digests and what restores check ---------------------------------


def _meta_file(directory: pathlib.Path, step: int) -> pathlib.Path:
  return directory / str(step) / "meta" / "metadata"


def _rewrite_meta(directory: pathlib.Path, step: int, change) -> None:
  path = _meta_file(directory, step)
  path.write_text(json.dumps(change(json.loads(path.read_text()))))


def test_an_asynchronous_save_records_its_digests_and_blocking(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  for step in (1, 2):
    ckpt.save(step, state(step), meta={"step": step})
  ckpt.wait_until_finished()
  assert len(ckpt.blocking_seconds) == 2
  assert all(s > 0 for s in ckpt.blocking_seconds)
  median, count = ckpt.median_blocking_seconds()
  assert count == 2 and median > 0
  meta = json.loads(_meta_file(tmp_path, 2).read_text())
  assert meta["step"] == 2 and meta["digest"] == digest.ALGORITHM
  assert meta["state_digests"] == digest.item_digests(state(2))
  restored = ckpt.restore(2, ABSTRACT)
  np.testing.assert_array_equal(restored["w"], state(2)["w"])
  ckpt.close()


def test_a_flipped_bit_on_disk_is_caught_and_named(tmp_path):
  """Arrays are stored uncompressed: one bit of `w` flipped in its data
  file restores without an error from orbax, and its digest catches it."""
  ckpt = open_checkpointer(tmp_path, max_to_keep=1)
  save_all(ckpt, {1: None})
  needle = np.asarray(state(1)["w"]).tobytes()[:64]
  for path in _data_files(tmp_path / "1"):
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    if at >= 0:
      data[at + 17] ^= 0x04
      path.write_bytes(bytes(data))
      break
  else:
    pytest.fail("w's bytes are in no data file: stored compressed?")
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r"its w do not "
                     "match the digests"):
    ckpt.restore(1, ABSTRACT)
  # b, restored alone, is intact.
  items = ckpt.restore_items(1, {"b": ABSTRACT["b"]})
  assert list(items) == ["b"]
  np.testing.assert_array_equal(items["b"], state(1)["b"])
  ckpt.close()


def test_restore_items_reads_and_checks_only_those_named(tmp_path):
  ckpt = open_checkpointer(tmp_path, max_to_keep=1)
  save_all(ckpt, {3: None})
  items = ckpt.restore_items(3, {"w": ABSTRACT["w"]})
  assert list(items) == ["w"]
  np.testing.assert_array_equal(items["w"], state(3)["w"])
  _rewrite_meta(tmp_path, 3, lambda m: {
      **m, "state_digests": {**m["state_digests"], "b": "0" * 32}})
  ckpt.restore_items(3, {"w": ABSTRACT["w"]})
  with pytest.raises(checkpoint.DamagedCheckpoint, match="its b do not"):
    ckpt.restore_items(3, {"b": ABSTRACT["b"]})
  _rewrite_meta(tmp_path, 3, lambda m: {
      **m, "state_digests": {"w": m["state_digests"]["w"]}})
  with pytest.raises(checkpoint.DamagedCheckpoint, match="its b do not"):
    ckpt.restore(3, ABSTRACT)
  ckpt.close()


def test_a_checkpoint_with_only_the_old_sha256_still_verifies(tmp_path):
  """Written before per-item digests: the whole state's sha256 checks a full
  restore; there is nothing to check items by."""
  ckpt = open_checkpointer(tmp_path, max_to_keep=1)
  save_all(ckpt, {4: None})
  old = {"step": 4, "state_sha256": checkpoint.state_sha256(state(4))}
  _rewrite_meta(tmp_path, 4, lambda m: old)
  assert ckpt.item_digests(4) is None
  np.testing.assert_array_equal(ckpt.restore(4, ABSTRACT)["w"], state(4)["w"])
  with pytest.raises(checkpoint.DamagedCheckpoint, match="no per-item"):
    ckpt.restore_items(4, {"w": ABSTRACT["w"]})
  _rewrite_meta(tmp_path, 4, lambda m: {**old, "state_sha256": "0" * 64})
  with pytest.raises(checkpoint.DamagedCheckpoint, match="sha256"):
    ckpt.restore(4, ABSTRACT)
  _rewrite_meta(tmp_path, 4, lambda m: {"step": 4})
  with pytest.raises(checkpoint.DamagedCheckpoint, match="no state digest"):
    ckpt.restore(4, ABSTRACT)
  ckpt.close()


def test_compressed_checkpoints_still_restore(tmp_path, monkeypatch):
  """Checkpoints written with orbax's default zstd compression."""
  monkeypatch.setattr(checkpoint, "COMPRESS", True)
  ckpt = open_checkpointer(tmp_path, max_to_keep=1)
  save_all(ckpt, {5: None})
  ckpt.close()
  monkeypatch.setattr(checkpoint, "COMPRESS", False)
  ckpt = open_checkpointer(tmp_path, max_to_keep=1)
  np.testing.assert_array_equal(ckpt.restore(5, ABSTRACT)["w"], state(5)["w"])
  np.testing.assert_array_equal(
      ckpt.restore_items(5, {"b": ABSTRACT["b"]})["b"], state(5)["b"])
  ckpt.close()


def test_a_renamed_checkpoint_is_set_aside_not_resumed(tmp_path):
  """checkpoints/2 renamed to checkpoints/5: it verifies, but resuming it
  would train steps 3.. and save over names it did not earn."""
  ckpt = open_checkpointer(tmp_path / "checkpoints", max_to_keep=3)
  save_all(ckpt, {1: None, 2: None})
  ckpt.close()
  (tmp_path / "checkpoints" / "2").rename(tmp_path / "checkpoints" / "5")
  ckpt = open_checkpointer(tmp_path / "checkpoints", max_to_keep=3)
  with pytest.raises(checkpoint.DamagedCheckpoint,
                     match="it holds step 2, not 5: its directory was "
                           "renamed"):
    ckpt.restore(5, ABSTRACT)
  restored, step = ckpt.restore_latest_good(ABSTRACT, tmp_path / "set_aside")
  assert step == 1 and float(restored["b"][0]) == 1
  assert (tmp_path / "set_aside" / "5.damaged").is_dir()
  ckpt.close()


class _RemovesTheWorkdir(collections.abc.Mapping):
  """A meta whose reading, in the background save, removes the workdir:
  the save is then in flight with its files gone."""

  def __init__(self, workdir: pathlib.Path):
    self._workdir = workdir
    self._meta = {"step": 2}

  def __getitem__(self, key):
    return self._meta[key]

  def __len__(self):
    return len(self._meta)

  def __iter__(self):
    shutil.rmtree(self._workdir, ignore_errors=True)
    return iter(self._meta)


# The failed save's leftover callbacks, as train.py's cli.quiet_failed_writes
# knows them.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_workdir_removed_during_a_save_is_one_line(tmp_path):
  """Once orbax's FileNotFoundError with a 90-line traceback."""
  ckpt = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints",
                                 max_to_keep=2)
  ckpt.save(2, state(2), meta=_RemovesTheWorkdir(tmp_path / "run"))
  with pytest.raises(RunDirError, match=r"disappeared while a checkpoint was "
                                        r"being written \(the workdir deleted "
                                        r"or moved\?\)"):
    ckpt.wait_until_finished()
