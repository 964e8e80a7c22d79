"""Out of memory as one line: the compiler is asked what a step needs
before it runs, and a batch that does not fit is named with one to try."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import jax
import pytest

from configs import smoke
from conftest import CACHE_FLAG
from conftest import REPO_ROOT
from mnist_resnet.data import mnist
from mnist_resnet.training import memory
from mnist_resnet.training import program as program_lib

GIB, MIB = 2**30, 2**20


class _Compiled:
  """Stands for a compiled step: its memory analysis and nothing else."""

  def __init__(self, argument, output, temp, alias=0):
    self._stats = types.SimpleNamespace(
        argument_size_in_bytes=argument, output_size_in_bytes=output,
        temp_size_in_bytes=temp, alias_size_in_bytes=alias)

  def memory_analysis(self):
    return self._stats


def test_required_bytes_counts_what_the_step_adds():
  step = _Compiled(argument=100, output=90, temp=1000, alias=80)
  # The donated state (alias) is not counted twice.
  assert memory.required_bytes(step) == (1110, 110)
  # Evaluation: the state's arrays are in memory already.
  assert memory.required_bytes(step, resident=True) == (1090, 90)


def test_smaller_batch_grows_linearly_above_the_fixed_part():
  # 1000 per device: 1 GiB fixed + 1 MiB per example. 600 MiB left above
  # the fixed part: 600 examples fit, 512 (a power of two) per device.
  need = GIB + 1000 * MIB
  assert memory.smaller_batch(1000, need, GIB, GIB + 600 * MIB, 4) == 2048
  # Never the batch asked for, even if the estimate says it fits.
  assert memory.smaller_batch(8, need, GIB, 100 * GIB, 1) == 4
  # Not one example above the fixed part, or not even the fixed part.
  assert memory.smaller_batch(1000, need, GIB, GIB + MIB // 2, 1) is None
  assert memory.smaller_batch(1000, need, GIB, GIB // 2, 1) is None


def test_a_step_that_does_not_fit_is_one_line(monkeypatch):
  devices = jax.device_count()
  monkeypatch.setattr(memory, "available_bytes",
                      lambda: GIB + 600 * MIB)
  step = _Compiled(argument=GIB, output=0, temp=1000 * MIB)
  with pytest.raises(memory.OutOfMemory) as e:
    memory.check_fits(step, what="the train step", key="batch_size",
                      batch_size=1000 * devices)
  assert str(e.value) == (
      f"config.batch_size={1000 * devices} (1000 per device) does not fit "
      f"in memory: the train step needs {GIB + 1000 * MIB} bytes (2.0 GiB) "
      f"per device, and a cpu device has {GIB + 600 * MIB} bytes (1.6 GiB) "
      f"free; try config.batch_size={512 * devices}")
  monkeypatch.setattr(memory, "available_bytes", lambda: GIB // 2)
  with pytest.raises(memory.OutOfMemory,
                     match="not even one example per device fits"):
    memory.check_fits(step, what="the train step", key="batch_size",
                      batch_size=1000 * devices)


def test_a_step_that_fits_or_an_unknown_free_memory_passes(monkeypatch):
  step = _Compiled(argument=GIB, output=0, temp=1000 * MIB)
  for free in (2 * GIB, None):
    monkeypatch.setattr(memory, "available_bytes", lambda free=free: free)
    memory.check_fits(step, what="the train step", key="batch_size",
                      batch_size=1000)


def test_free_memory_per_backend(monkeypatch):
  """GPU and TPU: the allocator's limit less what is in use; CPU: the
  host's available memory shared by its devices; else unknown."""
  assert 0 < memory.host_available_bytes() <= (
      os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
  monkeypatch.setattr(memory, "host_available_bytes", lambda: 8 * GIB)
  assert memory.available_bytes() == 8 * GIB // len(jax.local_devices())

  def device(platform, stats):
    return types.SimpleNamespace(platform=platform,
                                 memory_stats=lambda: stats)

  gpu = device("gpu", {"bytes_limit": 80 * GIB, "bytes_in_use": GIB})
  monkeypatch.setattr(jax, "local_devices", lambda: [gpu, gpu])
  assert memory.available_bytes() == 79 * GIB
  monkeypatch.setattr(jax, "local_devices",
                      lambda: [device("other", None)])
  assert memory.available_bytes() is None


def test_compiled_program_keeps_its_executable_and_is_checked(monkeypatch):
  """The tiny model's step compiled once: the executable the loop calls,
  whose real analysis the check refuses when too little is free."""
  config = smoke.get_config()
  config.batch_size = 8
  program = program_lib.build_program(config, mnist.TRAIN_EXAMPLES)
  step = program.compiled().train_step
  assert isinstance(step, jax.stages.Compiled)
  need, fixed = memory.required_bytes(step)
  assert 0 < fixed < need
  monkeypatch.setattr(memory, "available_bytes", lambda: need - 1)
  with pytest.raises(memory.OutOfMemory,
                     match=rf"config.batch_size=8 .* the train step needs "
                           rf"{need} bytes"):
    memory.check_fits(step, what="the train step", key="batch_size",
                      batch_size=8)


def test_train_py_out_of_memory_is_one_line(mnist_dir, tmp_path):
  """A batch whose step cannot fit (60000 images of 224x224, hundreds of
  GiB), device pipeline: one line naming the batch and the bytes, a batch
  to try, exit 2, before anything runs or is saved."""
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "train.py", "--config=configs/smoke.py",
       f"--workdir={workdir}", f"--config.data_dir={mnist_dir}",
       "--config.download=false", CACHE_FLAG, "--config.batch_size=60000",
       "--config.image_size=224", "--config.input_pipeline=device"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr
  line = errors[0]
  assert line.startswith(
      "error: config.batch_size=60000 (30000 per device) does not fit in "
      "memory: the train step needs "), line
  smaller = int(line.rpartition("try config.batch_size=")[2])
  per_device = smaller // 2
  assert smaller < 60000 and per_device & (per_device - 1) == 0, line
  assert not (workdir / "checkpoints").exists() or not any(
      (workdir / "checkpoints").iterdir())
