"""A workdir in a Cloud Storage bucket, end to end through train.py, on the
local Cloud Storage server: train, SIGTERM, resume, all from the bucket, and
nothing written locally; evaluate, predict and export read it; a bucket
that cannot be used, or goes away, and a lock taken over are one line,
exit 2."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from etils import epath
import PIL.Image
import PIL.ImageDraw
import pytest
from test_metrics import board_scalars
from test_train import SMOKE

from conftest import CACHE_FLAG
from conftest import REPO_ROOT
from mnist_resnet.core.errors import ConfigError
from mnist_resnet.training import validation
from mnist_resnet.workdir import runlock
from tests import gcs_emulator

PREEMPTED = 75
STEPS = 100
# Evaluation at the end only, and no periodic checkpoint: the preempted run's
# only checkpoint is the preemption's. 100 tiny steps take several seconds,
# time enough to send SIGTERM after the first logged step and before the end
# (and test_preemption's and test_goodput's runs compile the same train step).
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
  rerun_stderr: str


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
      stopped=stopped, after_sigterm=after_sigterm,
      rerun_stderr=rerun.stderr)


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
  # It gave its lease back (a lease, unlike a local flock, outlives its
  # process), so the rerun took the workdir at once, without watching a
  # lease for up to a minute.
  assert "run/lock.json" not in runs.after_sigterm
  assert "watching it" not in runs.rerun_stderr
  assert "took over" not in runs.rerun_stderr
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


def command(run: Run, module: str, *args: str) -> subprocess.CompletedProcess:
  """`python -m module ARGS` as `run` runs train.py (its cwd, HOME, TMPDIR
  and the local Cloud Storage server)."""
  return subprocess.run([sys.executable, "-m", module, *args],
                        cwd=run.places["cwd"], env=run.env | {
                            "PYTHONPATH": str(REPO_ROOT)},
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_evaluate_predict_export_read_the_bucket(runs, mnist_dir, tmp_path):
  """The tools of a finished run take its gs:// workdir as they take a
  directory: evaluate writes its report into the bucket, predict and export
  read the checkpoint from it."""
  bucket, _, _ = runs.straight
  workdir = f"gs://{bucket}/run"
  run = Run(tmp_path / "tools", runs.straight[2].env)
  evaluated = command(run, "mnist_resnet.evaluate", f"--workdir={workdir}",
                      f"--data_dir={mnist_dir}")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  accuracy = float(evaluated.stdout.split("accuracy ")[1].split()[0])
  assert accuracy == pytest.approx(results(workdir)["test_accuracy"],
                                   abs=1e-4)
  report = json.loads(epath.Path(f"{workdir}/eval_{STEPS}/eval.json")
                      .read_text())
  assert report["step"] == STEPS and report["eval_examples"] == 10000

  digit = tmp_path / "digit.png"
  image = PIL.Image.new("L", (28, 28))
  PIL.ImageDraw.Draw(image).line([(14, 4), (14, 23)], fill=255, width=3)
  image.save(digit)  # A one.
  predicted = command(run, "mnist_resnet.predict", f"--workdir={workdir}",
                      str(digit))
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  (line,) = predicted.stdout.splitlines()
  assert 0 <= json.loads(line)["digit"] <= 9

  out = tmp_path / "export"
  exported = command(run, "mnist_resnet.export", f"--workdir={workdir}",
                     f"--out={out}", "--formats=jax_export")
  assert exported.returncode == 0, exported.stderr[-3000:]
  manifest = json.loads((out / "export.json").read_text())
  assert (manifest["step"], manifest["workdir"]) == (STEPS, workdir)
  assert run.local_files() == []


@pytest.mark.parametrize("name, why", [
    ("b1", "3 to 63 characters"), ("a" * 64, "3 to 63 characters"),
    ("My-Bucket", "lowercase"), ("-bucket", "starts and ends"),
    ("bucket.", "starts and ends"), ("a" * 64 + ".b", "between dots"),
    ("goog-runs", "goog"), ("my-google-runs", "google"),
    ("192.168.5.4", "IP address")])
def test_bucket_names_cloud_storage_refuses(name, why):
  with pytest.raises(ConfigError) as raised:
    validation.validate_workdir(f"gs://{name}/run")
  assert str(raised.value).startswith(f"--workdir=gs://{name}/run: {name!r} "
                                      "is not a Cloud Storage bucket name")
  assert why in str(raised.value)


@pytest.mark.parametrize("name", ["abc", "a" * 63, "runs_2024-01.v2",
                                  "a" * 63 + "." + "b" * 63])
def test_bucket_names_cloud_storage_takes(name):
  validation.validate_workdir(f"gs://{name}/run")


def test_bad_bucket_name_is_one_line_before_anything_runs(
    gcs_server, mnist_dir, tmp_path):
  """gs://b1: the local server takes any name, Cloud Storage (and
  tensorstore, at the first save) does not; train.py and the tools say so
  at once."""
  with contextlib.suppress(urllib.error.HTTPError):  # made by an earlier run
    gcs_server.create_bucket("b1")
  run = Run(tmp_path, gcs_server.env())
  proc = run("gs://b1/run", f"--config.data_dir={mnist_dir}", *ARGS,
             timeout=120)
  line = assert_one_line_exit_2(run, proc)
  assert line.startswith("error: --workdir=gs://b1/run: 'b1' is not a Cloud "
                         "Storage bucket name"), line
  assert gcs_server.list_objects("b1") == []
  tool = command(run, "mnist_resnet.evaluate", "--workdir=gs://b1/run")
  assert tool.returncode == 2, tool.stderr[-3000:]
  assert tool.stderr.strip().splitlines() == [
      "error: workdir gs://b1/run: 'b1' is not a Cloud Storage bucket name: "
      "a name has 3 to 63 characters (222 with dots), not 2"]


def wait_for_object(gcs_server, bucket: str, name: str,
                    proc: subprocess.Popen) -> None:
  deadline = time.monotonic() + 240
  while read_object(gcs_server, bucket, name) is None:
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"no {name}:\n" + wait(proc)[-3000:])
    time.sleep(0.05)


def generations(gcs_server, bucket: str) -> dict[str, str]:
  """name -> generation of every object in `bucket`."""
  with urllib.request.urlopen(
      f"{gcs_server.url}/storage/v1/b/{bucket}/o", timeout=10) as r:
    return {o["name"]: o["generation"]
            for o in json.load(r).get("items", [])}


@pytest.mark.slow
def test_a_run_whose_lease_was_taken_over_stops_writing_nothing(
    gcs_server, mnist_dir, tmp_path):
  """Another run takes the lease over (as after believing this one dead):
  this run stops at its next checkpoint at the latest, with one line and
  exit 2, and writes nothing from then on: the lock, the metrics and the
  checkpoints are the new holder's."""
  bucket = f"taken-{os.getpid()}"
  gcs_server.create_bucket(bucket)
  workdir = f"gs://{bucket}/run"
  # A short lease: the takeover is noticed within 2 s (one renewal), long
  # before the next checkpoint (step 100) or metrics write (10 s later).
  run = Run(tmp_path, gcs_server.env() | {runlock.LEASE_ENV: "6"})
  proc = run.start(workdir, f"--config.data_dir={mnist_dir}",
                   "--config.num_train_steps=2000",
                   "--config.checkpoint_every_steps=100",
                   "--config.log_every_steps=10",
                   "--config.eval_every_steps=0")
  try:
    wait_for_object(gcs_server, bucket, "run/metrics.jsonl", proc)
    while not any(n.startswith("run/events.") for n in
                  gcs_server.list_objects(bucket)):  # the same flush's
      time.sleep(0.05)
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    theirs = storage.Client().bucket(bucket)
    theirs.blob("run/lock.json").upload_from_string(json.dumps(dict(
        host="other-host", pid=4242, started="2024-01-01T00:00:00+00:00",
        expires="2099-01-01T00:00:00+00:00", lease_seconds=60,
        token="theirs")))
    theirs.blob("run/metrics.jsonl").upload_from_string('{"step": 1}\n')
    taken_over = generations(gcs_server, bucket)
    stderr = wait(proc, timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 2, stderr[-3000:]
  assert "Traceback" not in stderr
  lines = stderr.strip().splitlines()
  assert [l for l in lines if l.startswith("error:")] == lines[-1:]
  assert lines[-1].startswith(f"error: lost the lock of workdir {workdir} "
                              "(gs://"), lines[-1]
  assert "now held by host other-host, pid 4242" in lines[-1]
  logged = [int(step) for step in re.findall(r"step (\d+):", stderr)]
  assert max(logged) <= 100, logged  # Stopped at the next checkpoint.
  assert generations(gcs_server, bucket) == taken_over
  assert checkpoint_steps(list(taken_over)) == []
  assert read_object(gcs_server, bucket, "run/metrics.jsonl") == (
      b'{"step": 1}\n')


@pytest.mark.slow
def test_a_bucket_gone_for_good_is_one_line_within_the_lease(
    mnist_dir, tmp_path):
  """The Cloud Storage server dies during a run (its own server here, not
  the session's): the run ends with the first error in one line, exit 2,
  within the lease plus 60 s (gcsfs gives up a request after about 30 s of
  retries), not after writes on close wait out theirs again."""
  server = gcs_emulator.GcsEmulator(tmp_path / "fake-gcs-server.log")
  try:
    server.create_bucket("going")
    run = Run(tmp_path / "run", server.env() | {runlock.LEASE_ENV: "10"})
    proc = run.start("gs://going/run", f"--config.data_dir={mnist_dir}",
                     "--config.download=false",
                     f"--config.num_train_steps={STEPS}",
                     "--config.eval_every_steps=100000",
                     "--config.checkpoint_every_steps=10",
                     "--config.log_every_steps=10")
    deadline = time.monotonic() + 240
    while "step 30:" not in proc.stderr_path.read_text():
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        raise AssertionError("no step 30:\n" + wait(proc)[-3000:])
      time.sleep(0.05)
  finally:
    server.stop()  # At step 30, as it saves.
  gone = time.monotonic()
  stderr = wait(proc, timeout=200)
  took = time.monotonic() - gone
  assert proc.returncode == 2, stderr[-3000:]
  assert took < 10 + 60, (took, stderr[-3000:])
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = stderr.strip().splitlines()
  assert [l for l in lines if l.startswith("error:")] == lines[-1:], (
      stderr[-3000:])
  assert re.match(r"error: (cannot write gs://going/run/|cannot reach |"
                  r"could not renew the lock |lost the lock )",
                  lines[-1]), lines[-1]
