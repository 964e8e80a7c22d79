"""The entry points' shared exit behaviour: failed writes are one line and
exit code 2, a failed program ends at once, whatever threads remain, and
libraries' INFO chatter stays off stderr."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT
from mnist_resnet.core import cli
from mnist_resnet.core import files

# What tensorstore (orbax's storage layer) raised in the main thread when a
# checkpoint filled a tmpfs: a ValueError, not an OSError.
TENSORSTORE_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at '
    'local file "/w/checkpoints/5.orbax-checkpoint-tmp/state/ocdbt.process_0/'
    '": Failed writing: "/w/checkpoints/5.orbax-checkpoint-tmp/state/'
    'ocdbt.process_0/d/9207": Failed to write 415126 bytes to file 16: No '
    "space left on device [os_error_code='28']")


def _wrapped(inner: BaseException, how: str) -> Exception:
  """`inner` as orbax's threads hand errors back: as the cause, the context
  or the argument of another exception."""
  outer = Exception("Save Finalize thread (save_finalize) failed.")
  if how == "cause":
    outer.__cause__ = inner
  elif how == "context":
    outer.__context__ = inner
  else:
    outer = RuntimeError(inner)
  return outer


@pytest.mark.parametrize("how", ["cause", "context", "argument"])
@pytest.mark.parametrize("inner, message", [
    (OSError(errno.ENOSPC, "No space left on device", "/w/ckpt/a"),
     "cannot write /w/ckpt/a: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/w/x"),
     "cannot write /w/x: Permission denied"),
    (OSError(errno.EROFS, "Read-only file system"),
     "cannot write: Read-only file system"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/out.tmp"),
     "cannot write /f/out.tmp: Not a directory"),
    (ValueError(TENSORSTORE_FULL), "cannot write /w/checkpoints/5.orbax-"
     "checkpoint-tmp/state/ocdbt.process_0/d/9207: No space left on device"),
])
def test_write_failure_walks_the_chain(inner, message, how):
  assert str(files.write_failure(inner)) == message
  assert str(files.write_failure(_wrapped(inner, how))) == message


@pytest.mark.parametrize("error", [
    ValueError("bad value"), FileNotFoundError(errno.ENOENT, "gone", "/x"),
    ValueError("NOT_FOUND: ... [os_error_code='2']"), KeyError("k")])
def test_write_failure_leaves_other_errors(error):
  assert files.write_failure(error) is None
  assert files.write_failure(_wrapped(error, "cause")) is None


def test_user_errors_report_a_full_disk_in_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    with cli.user_errors():
      raise RuntimeError("save failed") from ValueError(TENSORSTORE_FULL)
  assert e.value.code == 2
  assert capsys.readouterr().err == (
      "error: cannot write /w/checkpoints/5.orbax-checkpoint-tmp/state/"
      "ocdbt.process_0/d/9207: No space left on device\n")
  with pytest.raises(ValueError, match="a bug"):
    with cli.user_errors():
      raise ValueError("a bug")


# --- Exiting -----------------------------------------------------------------

# A program whose main leaves a non-daemon thread that never ends (as orbax
# does after a failed save), then ends as argv[1] says.
_STRAY_THREAD = textwrap.dedent("""
    import atexit, pathlib, sys, threading, time
    from mnist_resnet.core import cli

    marker = pathlib.Path(sys.argv[2])

    def main(argv):
      how = argv[1]
      if how == "success":
        def finish():  # Pending work: must not be cut off.
          time.sleep(1)
          marker.write_text("finished")
        threading.Thread(target=finish).start()
        return
      atexit.register(lambda: marker.write_text("exit handlers ran"))
      threading.Thread(target=threading.Event().wait).start()
      print("some output", flush=False)
      if how == "user_error":
        cli.fail("the disk is full")
      if how == "exit_code":
        sys.exit(75)
      raise RuntimeError("a bug")

    cli.run(main)
""")


@pytest.mark.parametrize("how, code", [
    ("user_error", 2), ("exit_code", 75), ("bug", 1)])
def test_failed_program_exits_despite_a_stray_thread(tmp_path, how, code):
  script = tmp_path / "prog.py"
  script.write_text(_STRAY_THREAD)
  marker = tmp_path / "marker"
  result = subprocess.run(
      [sys.executable, str(script), how, str(marker)], cwd=REPO_ROOT,
      env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
      text=True, timeout=60)
  assert result.returncode == code, result.stderr
  assert result.stdout == "some output\n"  # Flushed before the exit.
  assert marker.read_text() == "exit handlers ran"
  if how == "user_error":
    assert result.stderr == "error: the disk is full\n"
  if how == "bug":
    assert "RuntimeError: a bug" in result.stderr


def test_success_waits_for_pending_work(tmp_path):
  script = tmp_path / "prog.py"
  script.write_text(_STRAY_THREAD)
  marker = tmp_path / "marker"
  result = subprocess.run(
      [sys.executable, str(script), "success", str(marker)], cwd=REPO_ROOT,
      env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
      text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert marker.read_text() == "finished"


# --- Full disks (a small tmpfs; mounting needs root) -------------------------


@contextlib.contextmanager
def tmpfs(directory: pathlib.Path, options: str):
  """A tmpfs mounted at `directory` with `options`, or skip."""
  directory.mkdir(exist_ok=True)
  try:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                           str(directory)], capture_output=True, text=True)
    why = done.stderr.strip() if done.returncode else None
  except OSError as e:
    why = str(e)
  if why is not None:
    pytest.skip(f"cannot mount a tmpfs ({options}), which this test needs "
                f"(it runs as root, or where mount is allowed): {why}")
  try:
    yield directory
  finally:
    subprocess.run(["umount", str(directory)], check=True)


@pytest.fixture(scope="module")
def tiny_keras_file(tmp_path_factory):
  from test_keras_h5 import tiny_keras_layers
  from test_keras_h5 import write_legacy_h5
  path = tmp_path_factory.mktemp("keras") / "tiny.h5"
  write_legacy_h5(path, tiny_keras_layers())
  return path


def _one_error_line(stderr: str) -> str:
  assert "Traceback" not in stderr and "Event loop is closed" not in stderr
  errors = [l for l in stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == errors[0]
  return errors[0]


def _convert(keras_file, out) -> subprocess.CompletedProcess:
  """`python -m mnist_resnet.convert` of the tiny backbone into `out`."""
  return subprocess.run(
      [sys.executable, "-m", "mnist_resnet.convert",
       f"--keras_weights={keras_file}", "--model=resnet_tiny",
       f"--out={out}"], cwd=REPO_ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
      text=True, timeout=120)


# The tiny backbone's checkpoint takes about 900 kB in 34 files.
@pytest.mark.parametrize("options", ["size=64k", "nr_inodes=4"])
def test_convert_on_a_full_disk_is_one_line_and_exits(tiny_keras_file,
                                                      tmp_path, options):
  with tmpfs(tmp_path / "disk", options) as disk:
    result = _convert(tiny_keras_file, disk / "out")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1
    line = _one_error_line(result.stderr)
    assert line.startswith(f"error: cannot write {disk}/out.orbax-checkpoint")
    assert line.endswith(": No space left on device")
    assert not (disk / "out").exists()


def test_convert_under_a_file_is_refused_before_any_work(tiny_keras_file,
                                                         tmp_path):
  (tmp_path / "file").write_text("x")
  result = _convert(tiny_keras_file, tmp_path / "file" / "out")
  assert result.returncode == 2
  assert result.stderr == (f"error: --out {tmp_path}/file/out: {tmp_path}/file "
                           "is a file, not a directory\n")


def test_failed_saves_print_no_event_loop_tracebacks(tiny_keras_file,
                                                    tmp_path):
  """A failed save's other writes finish on orbax's event loop, closed by
  then, and tensorstore reports each through sys.unraisablehook ("Event
  loop is closed", a traceback each). Whether any are still pending is a
  race (about 3 saves in 4 on a 32k disk), so four saves: without
  cli.quiet_failed_writes's hook, nearly every run of this test fails."""
  for attempt in range(4):
    with tmpfs(tmp_path / f"disk{attempt}", "size=32k") as disk:
      result = _convert(tiny_keras_file, disk / "out")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1, result.stderr[-3000:]
    _one_error_line(result.stderr)


@pytest.mark.parametrize("options", ["size=300k", "nr_inodes=12"])
def test_train_on_a_full_disk_is_one_line_and_exits(mnist_dir, tmp_path,
                                                    options):
  """The first checkpoint (step 5) does not fit, or the files around it:
  one line, exit 2, and the process ends (orbax's threads would keep it
  alive). No compilation cache: in the workdir, it would fill the disk
  before any checkpoint."""
  with tmpfs(tmp_path / "disk", options) as disk:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"),
         "--config=configs/smoke.py", f"--config.data_dir={mnist_dir}",
         "--config.num_train_steps=20", "--config.checkpoint_every_steps=5",
         "--config.eval_every_steps=100000", "--config.compilation_cache_dir=",
         f"--workdir={disk / 'run'}"],
        cwd=REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    line = _one_error_line(result.stderr)
    assert line.startswith(f"error: cannot write {disk}/run/checkpoints/")
    assert line.endswith(": No space left on device")
    # No error log of orbax's (absl's E lines) beside the one line.
    assert not [l for l in result.stderr.splitlines() if l[:1] == "E"]


# --- Libraries' logs ---------------------------------------------------------

# absl's line for a Python INFO record names the file that logged it; the
# lines of C++ code ("I0000 00:00:1796465171.3 ...") do not match.
_PYTHON_INFO = re.compile(r"I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ([^:\s]+):\d+\] ")
_PROJECT_FILES = frozenset(
    p.name for p in [*REPO_ROOT.glob("mnist_resnet/**/*.py"),
                     REPO_ROOT / "train.py"])


@pytest.mark.slow
def test_libraries_info_logs_stay_off_stderr(mnist_dir, tmp_path):
  """A first run on a new CPU machine, then its export: orbax (at every
  checkpoint), JAX (no TPU library), matplotlib (a new font cache) and
  TensorFlow (the SavedModel) log INFO lines that a user can do nothing
  about. Only the project's own INFO lines reach stderr."""
  env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "matplotlib"),
         "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  env.pop("JAX_PLATFORMS", None)  # As a user runs it: JAX tries each one.
  run = tmp_path / "run"
  commands = [
      [str(REPO_ROOT / "train.py"), "--config=configs/smoke.py",
       f"--config.data_dir={mnist_dir}", "--config.num_train_steps=2",
       "--config.compilation_cache_dir=", f"--workdir={run}"],
      ["-m", "mnist_resnet.export", f"--workdir={run}",
       f"--out={tmp_path / 'exported'}"]]
  strays = []
  for command in commands:
    result = subprocess.run([sys.executable, *command], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    strays += [l for l in result.stderr.splitlines()
               if (m := _PYTHON_INFO.match(l)) and m[1] not in _PROJECT_FILES]
  assert not strays, "\n".join(strays)
