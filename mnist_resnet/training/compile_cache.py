"""A persistent XLA compilation cache: a restarted run loads the programs it
compiled before instead of compiling them again.

`enable(config.compilation_cache_dir, workdir)` is called by the entry point
(train.py) once per process, before anything compiles; it only sets JAX's
options. Where the cache lives and why, what it is keyed on, and what a
location that cannot be used does: docs/operations.md#compilation-cache.
"""

from __future__ import annotations

import os
import tempfile

from absl import logging
import jax

from mnist_resnet.core import files

# The placeholder for the run's workdir in config.compilation_cache_dir.
WORKDIR = "{workdir}"

# Programs that compile faster than this are not written (JAX's default is
# 1 s): they cost about as much to load as to compile, and the train step,
# evaluation step and initialisation that matter all take longer.
MIN_COMPILE_TIME_SECS = 1.0


def resolve(template: str, workdir: str | os.PathLike | None) -> str | None:
  """The cache directory `template` names: `{workdir}` replaced, `~`
  expanded, local paths made absolute; None for "" (no cache) or for a
  `{workdir}` template without a workdir."""
  if not template:
    return None
  if WORKDIR in template:
    if workdir is None:
      return None
    template = template.replace(WORKDIR, os.fspath(workdir).rstrip("/"))
  if files.is_remote(template):
    return template
  return os.path.abspath(os.path.expanduser(template))


def _unwritable(path: str) -> str | None:
  """Why `path` cannot hold the cache (a local directory we can create and
  write into), or None when it can."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    return e.strerror or str(e)
  return None


def enable(template: str, workdir: str | os.PathLike | None = None, *,
           min_compile_time_secs: float = MIN_COMPILE_TIME_SECS
           ) -> str | None:
  """Points JAX's persistent compilation cache at `template` (see
  `resolve`); returns the directory, or None when no cache is set.

  "" leaves JAX's own setting alone (off, unless $JAX_COMPILATION_CACHE_DIR
  is set). A local directory outside the workdir is checked here: one that
  cannot be created or written is a warning and the run goes on without a
  cache. One inside the workdir is not touched before the run has checked
  the workdir itself (a bad workdir is the run's one error line, not a
  cache warning); remote locations (gs://...) are not probed either: JAX
  opens them through etils.epath at the first compile and turns a failure
  into a warning.
  """
  path = resolve(template, workdir)
  if path is None:
    return None
  inside_workdir = WORKDIR in template
  if not inside_workdir and not files.is_remote(path):
    why = _unwritable(path)
    if why is not None:
      logging.warning("compilation cache off: cannot write to %s (%s); "
                      "compiling every program", path, why)
      return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(min_compile_time_secs))
  if files.is_remote(path):
    # XLA's own GPU autotuning cache, which JAX puts beside its cache when
    # that is enabled, is written by XLA's C++ file layer: local paths only.
    jax.config.update("jax_persistent_cache_enable_xla_caches", None)
  # Not logged: the location is in the config (results.json, config.json),
  # and a run that fails its checks next must print one line only.
  return path
