"""The persistent compilation cache (mnist_resnet/compile_cache.py).

JAX opens its cache once per process, so every test that enables one runs
in a subprocess: a first process fills the cache, a second one loads from it.
"""

import json
import os
import subprocess
import sys

from absl import logging as absl_logging
import jax
import pytest

from configs import default
from conftest import COMPILE_CACHE
from conftest import REPO_ROOT
from mnist_resnet.training import compile_cache

# Enables the cache at argv[1] for the workdir argv[2], if given (threshold
# 0: the tiny program takes far less than the default second to compile),
# compiles one program, prints what JAX's monitoring saw.
_CHILD = r"""
import json, os, sys
import jax, jax.numpy as jnp
from jax import monitoring
from mnist_resnet.training import compile_cache

events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
path = compile_cache.enable(sys.argv[1], *sys.argv[2:],
                            min_compile_time_secs=0)
created_up_front = path is not None and os.path.exists(path)
x = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(jnp.ones((8, 8)))
jax.block_until_ready(x)
print(json.dumps({
    "path": path,
    "jax_path": jax.config.jax_compilation_cache_dir,
    "created_up_front": created_up_front,
    "hits": events.count("/jax/compilation_cache/cache_hits"),
    "misses": events.count("/jax/compilation_cache/cache_misses"),
    "xla_caches": jax.config.jax_persistent_cache_enable_xla_caches}))
"""


def _child(location: str, env: dict[str, str] | None = None,
           workdir: str | None = None) -> dict:
  proc = subprocess.run(
      [sys.executable, "-c", _CHILD, location,
       *([workdir] if workdir else [])], cwd=REPO_ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})),
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_resolve():
  assert compile_cache.resolve("", "/runs/a") is None
  assert compile_cache.resolve("{workdir}/cc", "/runs/a/") == "/runs/a/cc"
  assert compile_cache.resolve("{workdir}/cc", "gs://b/run") == "gs://b/run/cc"
  assert compile_cache.resolve("{workdir}/cc", None) is None
  assert compile_cache.resolve("gs://b/cache", None) == "gs://b/cache"
  assert compile_cache.resolve("~/x", None) == os.path.expanduser("~/x")
  assert compile_cache.resolve("rel", None) == os.path.abspath("rel")


def test_default_is_inside_the_workdir():
  template = default.get_config().compilation_cache_dir
  assert compile_cache.resolve(template, "gs://b/run") == (
      "gs://b/run/compilation_cache")


def test_second_process_loads_what_the_first_compiled(tmp_path):
  cache = tmp_path / "cache"
  first = _child(str(cache))
  assert first["path"] == str(cache)
  assert first["hits"] == 0 and first["misses"] >= 1, first
  entries = sorted(p.name for p in cache.iterdir())
  assert entries and all(n.endswith("-cache") for n in entries), entries

  second = _child(str(cache))
  assert second["hits"] == first["misses"] and second["misses"] == 0, second
  assert sorted(p.name for p in cache.iterdir()) == entries


def test_workdir_template_needs_no_directory_up_front(tmp_path):
  """Inside the workdir, nothing is created before the run checks the
  workdir; JAX creates the directory at the first compile."""
  workdir = tmp_path / "run"
  got = _child("{workdir}/compilation_cache", workdir=str(workdir))
  path = workdir / "compilation_cache"
  assert got["path"] == got["jax_path"] == str(path), got
  assert not got["created_up_front"], got
  assert got["misses"] >= 1, got
  assert any(path.iterdir())


def test_train_py_fills_its_cache(trained_workdir):
  """A train.py run (the shared one, given conftest.CACHE_FLAG) leaves its
  train step in the cache, for the next run to load."""
  del trained_workdir
  entries = [p.name for p in COMPILE_CACHE.iterdir()]
  assert any(n.startswith("jit_train_step-") for n in entries), entries


@pytest.mark.parametrize("where", ["under_a_file", "unwritable"])
def test_unusable_location_is_one_warning(tmp_path, where, monkeypatch):
  if where == "under_a_file":
    (tmp_path / "file").write_text("x")
    location = str(tmp_path / "file" / "cache")
  else:
    if os.geteuid() == 0:
      pytest.skip("root writes into read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    location = str(ro / "cache")
  warnings = []
  monkeypatch.setattr(absl_logging, "warning",
                      lambda msg, *a: warnings.append(msg % a))
  before = jax.config.jax_compilation_cache_dir
  assert compile_cache.enable(location) is None
  assert jax.config.jax_compilation_cache_dir == before
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert warnings[0].startswith(f"compilation cache off: cannot write to "
                                f"{location} ("), warnings


def test_empty_leaves_jax_alone():
  before = jax.config.jax_compilation_cache_dir
  assert compile_cache.enable("", "/runs/a") is None
  assert jax.config.jax_compilation_cache_dir == before


def test_cache_in_a_bucket(gcs_bucket):
  """gs:// works through etils.epath (gcsfs here); XLA's GPU autotuning cache,
  which only writes local files, is left off."""
  location = f"{gcs_bucket}/run/compilation_cache"
  first = _child(location)
  assert first["misses"] >= 1 and first["xla_caches"] is None, first
  second = _child(location)
  assert second["hits"] == first["misses"] and second["misses"] == 0, second
