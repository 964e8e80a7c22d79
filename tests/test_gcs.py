"""A workdir in a Cloud Storage bucket, end to end through train.py, on the
local Cloud Storage server: train, SIGTERM, resume, all from the bucket, and
nothing written locally; a bucket that cannot be used is one line, exit 2."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from etils import epath
import pytest
from test_metrics import board_scalars
from test_train import SMOKE

from conftest import CACHE_FLAG
from conftest import REPO_ROOT

PREEMPTED = 75
STEPS = 120
# Evaluation at the end only, and no periodic checkpoint: the preempted run's
# only checkpoint is the preemption's. 120 tiny steps take several seconds,
# time enough to send SIGTERM after the first logged step and before the end.
ARGS = (f"--config.num_train_steps={STEPS}", "--config.log_every_steps=5",
        "--config.eval_every_steps=0",
        "--config.checkpoint_every_steps=100000")


def wait(proc: subprocess.Popen, timeout: float = 300) -> str:
  """Waits for `proc` (from Run.start); its stderr."""
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise AssertionError(f"train.py still running after {timeout} s:\n"
                         f"{proc.stderr_path.read_text()[-3000:]}") from None
  return proc.stderr_path.read_text()


class Run:
  """train.py in a subprocess, in an empty cwd with an empty HOME and
  TMPDIR, so that anything it writes locally can be seen. Its stderr goes
  to a file beside them (a pipe nobody reads while another run is awaited
  could fill and stall it)."""

  def __init__(self, tmp_path: pathlib.Path, env: dict[str, str]):
    self.places = {n: tmp_path / n for n in ("cwd", "home", "tmp")}
    for p in self.places.values():
      p.mkdir(parents=True)
    self.env = os.environ | env | {
        "HOME": str(self.places["home"]), "TMPDIR": str(self.places["tmp"]),
        "JAX_PLATFORMS": "cpu"}
    self._logs = (tmp_path / f"stderr.{n}.log" for n in itertools.count())

  def start(self, workdir: str, *args: str) -> subprocess.Popen:
    log = next(self._logs)
    with open(log, "w") as stderr:
      proc = subprocess.Popen(
          [sys.executable, str(REPO_ROOT / "train.py"), f"--config={SMOKE}",
           f"--workdir={workdir}", CACHE_FLAG, *args],
          cwd=self.places["cwd"], env=self.env, stdout=subprocess.DEVNULL,
          stderr=stderr)
    proc.stderr_path = log
    return proc

  def __call__(self, workdir: str, *args: str, timeout: float = 300
               ) -> subprocess.CompletedProcess:
    proc = self.start(workdir, *args)
    stderr = wait(proc, timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)

  def local_files(self) -> list[str]:
    """What the runs wrote under cwd, HOME and TMPDIR, less two libraries'
    user settings and caches, which are not a run's output: Keras's
    ~/.keras/keras.json (`import tensorflow`, for tf.data, imports Keras)
    and matplotlib's font list, ~/.cache/matplotlib (the run's pictures)."""
    found = []
    for place in self.places.values():
      for p in place.rglob("*"):
        relative = p.relative_to(place).parts
        if p.is_file() and relative[:1] != (".keras",) and (
            relative[:2] != (".cache", "matplotlib")):
          found.append(str(p))
    return found


def read_object(gcs_server, bucket: str, name: str) -> bytes | None:
  """An object as the server holds it now (no client cache), or None."""
  url = (f"{gcs_server.url}/download/storage/v1/b/{bucket}/o/"
         f"{urllib.parse.quote(name, safe='')}?alt=media")
  try:
    with urllib.request.urlopen(url, timeout=10) as r:
      return r.read()
  except urllib.error.HTTPError as e:
    if e.code == 404:
      return None
    raise


def results(workdir: str) -> dict:
  return json.loads(epath.Path(f"{workdir}/results.json").read_text())


def checkpoint_steps(names: list[str]) -> list[int]:
  return sorted({int(n.split("/")[2]) for n in names
                 if n.startswith("run/checkpoints/") and
                 n.split("/")[2].isdigit()})


@dataclasses.dataclass
class Runs:
  """An uninterrupted run and a preempted-then-resumed one, each in its own
  bucket: (bucket, object names once done, Run)."""
  straight: tuple[str, list[str], Run]
  resumed: tuple[str, list[str], Run]
  stopped: int             # The step the preempted run saved at.
  after_sigterm: list[str]   # The resumed bucket's objects after SIGTERM.


@pytest.fixture(scope="module")
def runs(gcs_server, mnist_dir, tmp_path_factory) -> Runs:
  """The straight run alongside the preempted run and its rerun (at once:
  a shorter test)."""
  args = (f"--config.data_dir={mnist_dir}", *ARGS)
  buckets = [f"straight-{os.getpid()}", f"resumed-{os.getpid()}"]
  for bucket in buckets:
    gcs_server.create_bucket(bucket)
  straight, resumed = (Run(tmp_path_factory.mktemp(b), gcs_server.env())
                       for b in buckets)
  reference = straight.start(f"gs://{buckets[0]}/run", *args)
  try:
    stopped, after_sigterm = preempt(gcs_server, resumed, buckets[1], args)
    rerun = resumed(f"gs://{buckets[1]}/run", *args)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    stderr = wait(reference)
    assert reference.returncode == 0, stderr[-4000:]
  finally:
    if reference.poll() is None:
      reference.kill()
      reference.wait()
  return Runs(
      straight=(buckets[0], gcs_server.list_objects(buckets[0]), straight),
      resumed=(buckets[1], gcs_server.list_objects(buckets[1]), resumed),
      stopped=stopped, after_sigterm=after_sigterm)


def preempt(gcs_server, run: Run, bucket: str, args) -> tuple[int, list[str]]:
  """Starts a run, SIGTERMs it once it logged a step; the step it saved at
  and the bucket's objects then."""
  proc = run.start(f"gs://{bucket}/run", *args)
  # The loop runs (SIGTERM handler installed) once a step is logged; the
  # first rows are written at once.
  deadline = time.monotonic() + 240
  while read_object(gcs_server, bucket, "run/metrics.jsonl") is None:
    if proc.poll() is not None:
      raise AssertionError("run ended early:\n" + wait(proc)[-3000:])
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError("no step logged:\n" + wait(proc)[-3000:])
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  stderr = wait(proc, timeout=120)
  assert proc.returncode == PREEMPTED, stderr[-3000:]
  names = gcs_server.list_objects(bucket)
  (stopped,) = checkpoint_steps(names)
  return stopped, names


@pytest.mark.slow
def test_run_writes_everything_to_the_bucket(runs, tmp_path):
  bucket, names, _ = runs.straight
  assert checkpoint_steps(names) == [STEPS], names
  for name in ("run/results.json", "run/metrics.jsonl", "run/config.json"):
    assert name in names, names
  events = [n for n in names if n.startswith("run/events.out.tfevents.")]
  assert len(events) == 1, names
  r = results(f"gs://{bucket}/run")
  assert r["step"] == STEPS and r["eval_examples"] == 10000
  # TensorBoard reads the bucket's event file as it is: every logged step
  # once.
  (tmp_path / pathlib.PurePosixPath(events[0]).name).write_bytes(
      epath.Path(f"gs://{bucket}/{events[0]}").read_bytes())
  assert sorted(board_scalars(tmp_path, "train_loss")) == list(
      range(5, STEPS + 1, 5))


@pytest.mark.slow
def test_sigterm_then_rerun_resumes_from_the_bucket(runs):
  # The preempted run's only checkpoint is the preemption's.
  assert 5 <= runs.stopped < STEPS
  assert "run/results.json" not in runs.after_sigterm
  bucket, names, _ = runs.resumed
  workdir = f"gs://{bucket}/run"
  resumed = results(workdir)
  assert resumed["resumed_from"] == runs.stopped
  assert resumed["steps_run"] == STEPS - runs.stopped
  reference = results(f"gs://{runs.straight[0]}/run")
  assert resumed["params_sha256"] == reference["params_sha256"]
  assert checkpoint_steps(names) == [runs.stopped, STEPS]
  rows = [json.loads(l) for l in
          epath.Path(f"{workdir}/metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train_loss" in r] == list(
      range(5, STEPS + 1, 5))
  assert [r["step"] for r in rows if "test_accuracy" in r] == [STEPS]


@pytest.mark.slow
def test_nothing_written_locally(runs):
  for _, _, run in (runs.straight, runs.resumed):
    assert run.local_files() == []
    assert not list(run.places["cwd"].iterdir())


def closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def assert_one_line_exit_2(run: Run, proc: subprocess.CompletedProcess
                           ) -> str:
  """Exit 2, stderr one line, and no local write (no `gs:` folder)."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
  assert run.local_files() == []
  assert not any(p.name.startswith("gs:")
                 for p in run.places["cwd"].iterdir())
  return lines[0]


def test_missing_bucket_is_one_line(gcs_server, mnist_dir, tmp_path):
  run = Run(tmp_path, gcs_server.env())
  workdir = f"gs://no-such-bucket-{os.getpid()}/run"
  # A bounded time: the timeout fails the test.
  proc = run(workdir, f"--config.data_dir={mnist_dir}", *ARGS, timeout=120)
  line = assert_one_line_exit_2(run, proc)
  assert f"no-such-bucket-{os.getpid()}" in line


def test_unreachable_server_is_one_line(gcs_server, mnist_dir, tmp_path):
  nobody = f"http://127.0.0.1:{closed_port()}"
  run = Run(tmp_path, gcs_server.env() | {
      "STORAGE_EMULATOR_HOST": nobody, "TENSORSTORE_GCS_HTTP_URL": nobody})
  workdir = "gs://some-bucket/run"
  # A bounded time: the timeout fails the test.
  proc = run(workdir, f"--config.data_dir={mnist_dir}", *ARGS, timeout=120)
  line = assert_one_line_exit_2(run, proc)
  assert "gs://some-bucket/run" in line
