"""SIGTERM, SIGKILL and NaN: a failure costs at most the current step."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_gcs import read_object
from test_train import SMOKE
from test_train import logged_steps
from test_train import results
from test_train import run_train

from conftest import CACHE_FLAG
from conftest import REPO_ROOT
from mnist_resnet.workdir import runlock

PREEMPTED = 75
INTERRUPTED = 130
# A signal sent once step 10 is logged still finds the run 90 steps (seconds
# of training) from its end, as in test_gcs's 120 steps logged every 5.
STEPS = 100
ARGS = (f"--config.num_train_steps={STEPS}",
        "--config.checkpoint_every_steps=40", "--config.eval_every_steps=0",
        "--config.log_every_steps=10", "--config.max_checkpoints_to_keep=10")


@pytest.fixture(scope="module")
def uninterrupted(mnist_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run_train(workdir, f"--config.data_dir={mnist_dir}", *ARGS)
  return results(workdir)


def as_from_a_terminal():
  """Ctrl-C and a closed terminal's SIGHUP reach a program started from a
  terminal; a test runner that is itself a background job (CI) hands SIGINT
  down ignored, one under nohup SIGHUP, and train.py keeps ignored signals
  ignored."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start_train(workdir, *args) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen(
      [sys.executable, str(REPO_ROOT / "train.py"), f"--config={SMOKE}",
       f"--workdir={workdir}", *args], cwd=REPO_ROOT, env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
      preexec_fn=as_from_a_terminal)


def checkpoint_steps(workdir) -> list[int]:
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def wait_for(predicate, proc, timeout=300.0, poll=0.02):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError("run ended early:\n" + proc.stderr.read()[-3000:])
    time.sleep(poll)
  raise AssertionError("timed out waiting")


# The same run with a checkpoint period it never reaches: a checkpoint can
# only come from the preemption itself. Checkpointing does not change the
# training, so the result must equal `uninterrupted` (saved every 40 steps).
NO_PERIODIC_SAVE_ARGS = tuple(
    a for a in ARGS if not a.startswith("--config.checkpoint_every_steps=")
) + ("--config.checkpoint_every_steps=100000",)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, PREEMPTED),
                                          (signal.SIGINT, INTERRUPTED)])
def test_signal_saves_current_step_and_resumes_exactly(
    mnist_dir, tmp_path, uninterrupted, signum, code):
  """SIGTERM (preemption) and Ctrl-C alike: save at the step reached, exit
  75 or 130, and the rerun ends where an uninterrupted run ends."""
  workdir = tmp_path / "run"
  args = (f"--config.data_dir={mnist_dir}", *NO_PERIODIC_SAVE_ARGS)
  # The shared compilation cache: the signal comes after the compilation.
  proc = start_train(workdir, *args, CACHE_FLAG)
  # Deterministic trigger: the loop is running once it has logged its first
  # step (10 of 100).
  wait_for(lambda: logged_steps(workdir), proc)
  seen = max(logged_steps(workdir))
  sent = time.time()
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=60)
  assert time.time() - sent < 60
  assert proc.returncode == code, stderr[-3000:]
  assert "Traceback" not in stderr
  said = re.findall(r"checkpoint saved at step (\d+)", stderr)
  assert len(said) == 1, stderr[-3000:]
  stopped = int(said[0])
  assert seen <= stopped < STEPS, (seen, stopped)
  # The one checkpoint is the preemption's, at the step the log names.
  assert checkpoint_steps(workdir) == [stopped], stderr[-3000:]
  assert not (workdir / "results.json").exists()

  run_train(workdir, *args)
  resumed = results(workdir)
  assert resumed["resumed_from"] == stopped
  assert resumed["steps_run"] == STEPS - stopped
  assert resumed["params_sha256"] == uninterrupted["params_sha256"]


@pytest.mark.parametrize("signum, code, when", [
    (signal.SIGTERM, PREEMPTED, "imports"),
    (signal.SIGTERM, PREEMPTED, "data"),
    (signal.SIGINT, INTERRUPTED, "data"),
    (signal.SIGHUP, PREEMPTED, "data"),
    (signal.SIGTERM, PREEMPTED, "lease")])
def test_signal_during_start_up_exits_at_once(mnist_dir, tmp_path, signum,
                                              code, when, gcs_server):
  """Before the first step (imports, data, compile, restore) there is
  nothing to save: one line, the signal's exit code, at once, the lock
  released. SIGHUP (a closed terminal) counts as SIGTERM. "lease": a gs://
  workdir, whose lease (unlike a local flock) outlives the process unless
  the run gives it back."""
  workdir = tmp_path / "run"
  if when == "lease":
    bucket = f"start-up-{os.getpid()}"
    workdir = gcs_server.create_bucket(bucket) + "/run"
  proc = start_train(workdir, f"--config.data_dir={mnist_dir}", *ARGS)
  # The handlers are installed before train.py imports anything slow (JAX
  # takes seconds); the first line on stderr comes later (data loading).
  first = ""
  if when == "imports":
    time.sleep(1.0)
  elif when == "lease":
    wait_for(lambda: read_object(gcs_server, bucket, "run/lock.json"), proc)
    time.sleep(0.5)  # Out of take_lock, on to the data.
  else:
    first = proc.stderr.readline()
    assert first, "no output"
  sent = time.time()
  proc.send_signal(signum)
  stderr = first + proc.communicate(timeout=60)[1]
  assert time.time() - sent < 10
  assert proc.returncode == code, stderr[-3000:]
  assert "Traceback" not in stderr
  assert stderr.rstrip().splitlines()[-1].startswith("stopped: "), stderr
  if when == "lease":
    assert read_object(gcs_server, bucket, "run/lock.json") is None
    return
  assert checkpoint_steps(workdir) == []
  # The lock went with the process.
  runlock.acquire(workdir).release()
  if (signum, when) == (signal.SIGTERM, "data"):
    # What start-up wrote does not stop the rerun (once: every case leaves
    # the same files, and a run costs half a minute).
    run_train(workdir, f"--config.data_dir={mnist_dir}",
              "--config.num_train_steps=2", "--config.eval_every_steps=0")


def test_signal_during_a_long_native_call_exits_at_once(tmp_path):
  """Python runs a handler only between bytecodes, so before the loop one
  would wait out an XLA compile (tens of seconds). The watcher thread does
  not: here the main thread is inside a native call that releases the GIL
  and never checks for signals, as XLA's compiler is."""
  released = tmp_path / "released"
  code = textwrap.dedent(f"""
      import hashlib, pathlib
      from mnist_resnet.training import preemption
      signals = preemption.StopSignals()
      signals.on_early_exit(pathlib.Path({str(released)!r}).touch)
      print("compiling", flush=True)
      hashlib.pbkdf2_hmac("sha256", b"key", b"salt", 2_000_000_000)  # Minutes.
      print("returned", flush=True)
  """)
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    assert proc.stdout.readline() == "compiling\n"
    time.sleep(0.5)  # Inside the native call.
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
  finally:
    proc.kill()
  assert time.time() - sent < 5
  assert proc.returncode == PREEMPTED, stderr
  assert stdout == ""
  assert stderr.startswith("stopped: SIGTERM before the first step"), stderr
  assert released.exists()


def test_second_ctrl_c_exits_at_once():
  """In the loop the first Ctrl-C only asks for a save at the next step; a
  second one ends the process now with 130 (committed checkpoints are atomic,
  a save in flight is a temporary directory the next start removes)."""
  code = textwrap.dedent("""
      import os, signal, time
      from mnist_resnet.training import preemption
      signals = preemption.StopSignals()
      signals.loop_started(multiprocess=False)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)
      assert signals.stop_requested(1, None) == signal.SIGINT
      print("saving", flush=True)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(30)
      print("still running", flush=True)
  """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=20,
                        preexec_fn=as_from_a_terminal)
  assert proc.returncode == INTERRUPTED, proc.stderr
  assert proc.stdout == "saving\n"
  assert proc.stderr == "error: interrupted\n"


@pytest.mark.slow
def test_sigkill_during_async_save_resumes_from_previous(
    mnist_dir, tmp_path, uninterrupted):
  """A save killed half-way is ignored; the run resumes from the one before
  and ends where an uninterrupted run ends."""
  for attempt in range(5):
    workdir = tmp_path / f"run{attempt}"
    proc = start_train(workdir, f"--config.data_dir={mnist_dir}", *ARGS,
                       CACHE_FLAG)
    complete = []

    def saving():
      directory = workdir / "checkpoints"
      if not directory.exists():
        return False
      names = os.listdir(directory)
      complete[:] = sorted(int(n) for n in names if n.isdigit())
      # Kill during the second save, so a complete one exists before it.
      return complete and any("tmp" in n for n in names)

    try:
      wait_for(saving, proc, poll=0.002)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.wait(timeout=60)
    names = os.listdir(workdir / "checkpoints")
    partial = [n for n in names if "tmp" in n]
    if partial:
      break
  else:
    pytest.fail("could not catch a save in flight in 5 attempts")

  assert not (workdir / "results.json").exists()
  before = max(complete)
  run_train(workdir, f"--config.data_dir={mnist_dir}", *ARGS)
  resumed = results(workdir)
  assert resumed["resumed_from"] == before, (partial, complete)
  assert resumed["params_sha256"] == uninterrupted["params_sha256"]
  assert not [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]


def _diverge(workdir, mnist_dir, *args):
  proc = run_train(workdir, f"--config.data_dir={mnist_dir}",
                   "--config.num_train_steps=60",
                   "--config.checkpoint_every_steps=1",
                   "--config.log_every_steps=20", "--config.eval_every_steps=0",
                   *args, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  return errors[0]


def test_diverged_state_is_never_kept(mnist_dir, tmp_path):
  """A learning rate that really diverges, a checkpoint every step: the
  loss of step 4 is the first NaN, so the state of step 3 (saved) is bad and
  set aside; checkpoints 1 and 2 stay. Checkpoint 2 then fails its
  evaluation and is set aside in turn; checkpoint 1 is good."""
  error = _diverge(tmp_path, mnist_dir, "--config.warmup_steps=20",
                   "--config.learning_rate=1e30")
  # Measured: step 1 runs at learning rate 0 and step 2 at 5e28 (warmup),
  # but step 2 moves only the output layer (it starts at zero, so no
  # gradient reaches the backbone); step 3 moves the backbone, and the loss
  # of step 4 is NaN.
  assert re.search(r"non-finite train loss or gradient at step 4\b", error)
  assert "the latest checkpoint, step 2, is good" in error, error
  assert checkpoint_steps(tmp_path) == [1, 2]
  assert (tmp_path / "set_aside" / "3.diverged" / "state").is_dir()
  assert not (tmp_path / "results.json").exists()
  # Checkpoint 2 trained to a finite loss (batch statistics) but evaluates
  # to NaN (running statistics): the final evaluation sets it aside too.
  error = _diverge(tmp_path, mnist_dir, "--config.num_train_steps=2",
                   "--config.warmup_steps=20", "--config.learning_rate=1e30")
  assert error.startswith("error: non-finite evaluation loss at step 2 ")
  assert "the latest checkpoint, step 1, is good" in error, error
  assert checkpoint_steps(tmp_path) == [1]
  assert (tmp_path / "set_aside" / "2.diverged" / "state").is_dir()
  # Checkpoint 1 as the final state of a 1-step run: evaluated, finite.
  run_train(tmp_path, f"--config.data_dir={mnist_dir}",
            "--config.num_train_steps=1", "--config.warmup_steps=20",
            "--config.learning_rate=1e30", "--config.eval_every_steps=0")
  assert 0 < results(tmp_path)["test_loss"] < 10


def test_finite_but_diverged_weights_are_not_kept(mnist_dir, tmp_path):
  """learning_rate=1e36 from the first step: the weights after step 1 are
  finite (up to ~1e36) but their loss is NaN; no checkpoint is left."""
  error = _diverge(tmp_path, mnist_dir, "--config.warmup_steps=0",
                   "--config.learning_rate=1e36")
  assert re.search(r"at step 2\b", error) and "no checkpoint is left" in error
  assert checkpoint_steps(tmp_path) == []
  assert (tmp_path / "set_aside" / "1.diverged").is_dir()


def test_second_run_on_a_live_workdir_is_refused(mnist_dir, tmp_path):
  """Two train.py on one workdir: the second stops at start with one line
  naming the first (before reading data), and the first finishes unharmed."""
  workdir = tmp_path / "run"
  # Logged from step 1 and saved every 5 steps: when the second starts, 99
  # steps with their saves, an evaluation and a report (12.5 s here) remain,
  # and the second stops at the lock within 3 s. (ARGS's step count: its
  # train step is compiled already.)
  first = start_train(workdir, f"--config.data_dir={mnist_dir}", *ARGS,
                      "--config.log_every_steps=1",
                      "--config.checkpoint_every_steps=5", CACHE_FLAG)
  try:
    wait_for(lambda: logged_steps(workdir), first)
    second = run_train(workdir, f"--config.data_dir={mnist_dir}", *ARGS,
                       "--config.seed=1", check=False)
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [l for l in second.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr
    assert f"pid {first.pid}" in errors[0] and "in use" in errors[0], errors
  finally:
    _, stderr = first.communicate(timeout=300)
  assert first.returncode == 0, stderr[-3000:]
  assert results(workdir)["config"]["seed"] == 0


def test_signals_ignored_at_start_stay_ignored():
  """nohup and background jobs: an ignored SIGHUP or SIGINT is not taken
  over (the program would otherwise die or stop where its user said not
  to)."""
  code = textwrap.dedent("""
      import os, signal, time
      signal.signal(signal.SIGHUP, signal.SIG_IGN)
      signal.signal(signal.SIGINT, signal.SIG_IGN)
      from mnist_resnet.training import preemption
      signals = preemption.StopSignals()
      os.kill(os.getpid(), signal.SIGHUP)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)
      print("still running", flush=True)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(30)
  """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=20)
  assert proc.stdout == "still running\n"
  assert proc.returncode == PREEMPTED, proc.stderr
  assert proc.stderr.startswith("stopped: SIGTERM before the first step")
