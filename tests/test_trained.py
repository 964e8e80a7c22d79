"""`trained.load` restores only the variables evaluation reads, checked item
by item, and still reads a checkpoint written with one sha256."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from configs import smoke
from mnist_resnet.data import mnist
from mnist_resnet.training import program as program_lib
from mnist_resnet.training import trained
from mnist_resnet.workdir import checkpoints as checkpoint_lib
from mnist_resnet.workdir.rundir import RunDirError
from mnist_resnet.workdir.workdir import Workdir

STEP = 7


def make_run(workdir: pathlib.Path, ema_decay: float):
  """A workdir with config.json and one checkpoint at STEP, whose EMA pair
  (when kept) differs from the live one; returns the saved state."""
  config = smoke.get_config()
  config.ema_decay = ema_decay
  Workdir(workdir).save_config(config.to_dict())
  program = program_lib.build_program(config, mnist.TRAIN_EXAMPLES)
  state = program.initial_state()
  if state.ema:
    state = state.replace(ema=jax.tree.map(lambda x: x + 1, state.ema))
  ckpt = checkpoint_lib.Checkpointer(Workdir(workdir).checkpoint_dir,
                                     max_to_keep=1, async_save=False)
  ckpt.save(STEP, state, meta={"step": STEP})
  ckpt.close()
  return jax.device_get(state)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[float, tuple[pathlib.Path, object]]:
  """ema_decay -> (workdir, saved state), made once; tests copy them."""
  made = {}
  for ema_decay in (0.0, 0.99):
    workdir = tmp_path_factory.mktemp("run")
    made[ema_decay] = workdir, make_run(workdir, ema_decay)
  return made


def copy_run(runs, ema_decay: float, tmp_path: pathlib.Path):
  workdir, saved = runs[ema_decay]
  shutil.copytree(workdir, tmp_path / "run")
  return tmp_path / "run", saved


def meta_file(workdir: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(Workdir(workdir).checkpoint_dir) / str(STEP) / "meta" / (
      "metadata")


def assert_tree_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def spy(monkeypatch) -> list[list[str]]:
  """From now on: the items each restore_items call asks for; a full
  restore or an optimizer built fails the test."""
  asked = []
  real = checkpoint_lib.Checkpointer.restore_items

  def restore_items(self, step, targets):
    asked.append(sorted(targets))
    return real(self, step, targets)

  def forbidden(*args, **kwargs):
    raise AssertionError("a full restore is not needed")

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "restore_items",
                      restore_items)
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "restore", forbidden)
  monkeypatch.setattr(program_lib, "create_optimizer", forbidden)
  return asked


@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
def test_load_restores_only_the_evaluation_variables(runs, tmp_path,
                                                     monkeypatch, ema_decay):
  workdir, saved = copy_run(runs, ema_decay, tmp_path)
  asked = spy(monkeypatch)
  model = trained.load(workdir, "latest")
  assert model.step == STEP
  pair = saved.ema or {"params": saved.params,
                       "batch_stats": saved.batch_stats}
  assert_tree_equal(model.params, pair["params"])
  assert_tree_equal(model.batch_stats, pair["batch_stats"])
  assert asked == [["ema"] if ema_decay else ["batch_stats", "params"]]


def test_load_refuses_an_item_that_does_not_match_its_digest(runs, tmp_path):
  workdir, _ = copy_run(runs, 0.0, tmp_path)
  meta = json.loads(meta_file(workdir).read_text())
  meta["state_digests"]["params"] = "0" * 32
  meta_file(workdir).write_text(json.dumps(meta))
  with pytest.raises(RunDirError, match=r"cannot be used: its params do not "
                     "match"):
    trained.load(workdir, STEP)


@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
def test_load_reads_a_checkpoint_with_only_the_old_sha256(runs, tmp_path,
                                                          ema_decay):
  """Written before per-item digests: one full restore, checked against the
  whole state's sha256."""
  workdir, saved = copy_run(runs, ema_decay, tmp_path)
  meta = json.loads(meta_file(workdir).read_text())
  old = {"step": meta["step"],
         "state_sha256": checkpoint_lib.state_sha256(saved)}
  meta_file(workdir).write_text(json.dumps(old))
  model = trained.load(workdir, STEP)
  pair = saved.ema or {"params": saved.params,
                       "batch_stats": saved.batch_stats}
  assert_tree_equal(model.params, pair["params"])
  old["state_sha256"] = "0" * 64
  meta_file(workdir).write_text(json.dumps(old))
  with pytest.raises(RunDirError, match="sha256"):
    trained.load(workdir, STEP)
