"""Reporter: metrics.jsonl and TensorBoard's event files (written through
tensorboardX), on a local directory and on a bucket of the local Cloud Storage
server, read back with TensorBoard's own readers."""

from __future__ import annotations

import errno
import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap

from etils import epath
import jax.numpy as jnp
from PIL import Image
import pytest
from test_train import tensorboard_scalars

from conftest import REPO_ROOT
from mnist_resnet.core.errors import WriteError
from mnist_resnet.training import progress
from mnist_resnet.workdir import metrics as metrics_lib
from mnist_resnet.workdir import rundir
from mnist_resnet.workdir.rundir import RunDirError
from mnist_resnet.workdir.workdir import Workdir


def tiny_png(height: int, width: int) -> bytes:
  """An RGB PNG of `height` x `width` pixels."""
  buffer = io.BytesIO()
  Image.new("RGB", (width, height), (40, 80, 200)).save(buffer, format="png")
  return buffer.getvalue()


def accumulator(directory):
  """TensorBoard's legacy reader (images) over the event files of
  `directory`."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(
      str(directory), size_guidance={"images": 0})
  acc.Reload()
  return acc


def board_scalars(directory, tag) -> dict[int, float]:
  """step -> value of `tag` as TensorBoard's reader shows it (with its purge
  of the steps a restarted run trains again): each step once."""
  from tensorboard.backend.event_processing import plugin_event_accumulator
  from tensorboard.util import tensor_util
  acc = plugin_event_accumulator.EventAccumulator(
      str(directory), size_guidance={"tensors": 0}, purge_orphaned_data=True)
  acc.Reload()
  assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
  events = acc.Tensors(tag)
  steps = [e.step for e in events]
  assert len(set(steps)) == len(steps), steps
  return {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
          for e in events}


def rows(path) -> list[dict]:
  return [json.loads(l) for l in epath.Path(path).read_text().splitlines()]


def run_reporter(workdir, steps, *, start_step=0, scale=1.0):
  reporter = Workdir(workdir).open_metrics(writes=True, total_steps=max(steps),
                                start_step=start_step)
  for step in steps:
    reporter.scalars(step, {"train_loss": scale / step, "lr": 0.1})
  reporter.close()


def event_files(directory) -> list[pathlib.Path]:
  return sorted(pathlib.Path(directory).glob("events.out.tfevents.*"))


def records(path) -> list:
  """The Event protobufs of one event file, in order."""
  from tensorboard.compat.proto import event_pb2
  data, offset, events = pathlib.Path(path).read_bytes(), 0, []
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    events.append(event_pb2.Event.FromString(
        data[offset + 12:offset + 12 + length]))
    offset += 16 + length
  return events


def test_event_file_scalars(tmp_path):
  reporter = Workdir(tmp_path).open_metrics(writes=True, total_steps=2,
                                start_step=0)
  reporter.scalars(1, {"loss": 2.5, "accuracy": 0.25})
  reporter.scalars(2, {"loss": -1e-3})
  reporter.close()
  (path,) = event_files(tmp_path)
  name = path.name.split(".")
  assert name[3].isdigit() and name[-2] == str(os.getpid())
  assert board_scalars(tmp_path, "loss") == {1: 2.5,
                                             2: pytest.approx(-1e-3)}
  assert board_scalars(tmp_path, "accuracy") == {1: 0.25}
  # The reader of test_train (TensorFlow's record reader, which checks
  # every CRC) sees them as it saw tf.summary's.
  assert tensorboard_scalars(tmp_path) == {
      1: {"loss": 2.5, "accuracy": 0.25}, 2: {"loss": pytest.approx(-1e-3)}}


def test_event_file_image(tmp_path):
  reporter = Workdir(tmp_path).open_metrics(writes=True, total_steps=2,
                                start_step=0)
  png = tiny_png(3, 4)
  reporter.image(2, "confusion", png)
  reporter.scalars(2, {"loss": 1.0})
  reporter.close()
  (image,) = accumulator(tmp_path).Images("confusion")
  assert (image.step, image.height, image.width) == (2, 3, 4)
  assert image.encoded_image_string == png
  assert board_scalars(tmp_path, "loss") == {2: 1.0}


def test_event_file_starts_with_version_then_restart_marker(tmp_path):
  """TensorBoard purges on a restart only in files of version 2."""
  reporter = Workdir(tmp_path).open_metrics(writes=True, total_steps=9,
                                start_step=4)
  reporter.scalars(5, {"x": 1.0})
  reporter.close()
  (path,) = event_files(tmp_path)
  first, marker, scalars = records(path)
  assert first.file_version == "brain.Event:2"
  assert (marker.step, marker.session_log.status) == (5, 1)  # START
  assert (scalars.step, scalars.summary.value[0].tag) == (5, "x")


def test_writes_without_tensorflow(tmp_path):
  """As on an accelerator image (accelerator_image.py), and without
  TensorBoard either: the event files are written, and TensorBoard reads
  them (its reader checks the CRCs)."""
  script = textwrap.dedent(f"""
      import sys
      from tests import accelerator_image
      BLOCKED = accelerator_image.BLOCKED + ("tensorboard",)
      accelerator_image.BLOCKED = BLOCKED
      sys.meta_path.insert(0, accelerator_image.AcceleratorImage())
      from mnist_resnet.workdir.workdir import Workdir
      r = Workdir({str(tmp_path)!r}).open_metrics(writes=True, total_steps=7,
                             start_step=0)
      r.scalars(7, {{"loss": 0.5}})
      r.image(7, "img", {tiny_png(2, 2)!r})
      r.close()
      loaded = [m for m in sys.modules
                if any(m == b or m.startswith(b + ".") for b in BLOCKED)]
      assert not loaded, loaded
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert board_scalars(tmp_path, "loss") == {7: 0.5}
  assert accumulator(tmp_path).Images("img")[0].encoded_image_string == (
      tiny_png(2, 2))


def test_rollover_starts_a_new_file(tmp_path, monkeypatch):
  """Each flush rewrites the current file whole: past ROLLOVER_BYTES the
  next events go to a new one, and TensorBoard reads them all."""
  monkeypatch.setattr(metrics_lib, "ROLLOVER_BYTES", 2000)
  reporter = Workdir(tmp_path).open_metrics(writes=True, total_steps=100,
                                start_step=0)
  for step in range(1, 101):
    reporter.scalars(step, {"loss": float(step)})
    reporter.flush()
  reporter.close()
  paths = event_files(tmp_path)
  # About 50 bytes a step: a file closes at the first flush past 2000.
  assert len(paths) >= 3
  assert all(p.stat().st_size < 2100 for p in paths)
  assert board_scalars(tmp_path, "loss") == {s: s for s in range(1, 101)}


def test_resumes_within_one_second_keep_their_order(tmp_path):
  """TensorBoard reads files in name order, and a restart marker only drops
  what it read before: twelve resumes in a row (one process, likely one
  second), each from the step before the last run's, show each step once,
  with the value of the last run that logged it."""
  for run in range(12):
    reporter = Workdir(tmp_path).open_metrics(writes=True, total_steps=12,
                                  start_step=run)
    for step in range(run + 1, 13):
      reporter.scalars(step, {"loss": 100.0 * run + step})
    reporter.close()
  assert len(event_files(tmp_path)) == 12
  assert board_scalars(tmp_path, "loss") == {
      s: 100.0 * (s - 1) + s for s in range(1, 13)}


def test_reporter_writes_metrics_and_tensorboard(tmp_path):
  run_reporter(tmp_path, [10, 20, 30])
  logged = rows(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in logged] == [10, 20, 30]
  board = tensorboard_scalars(tmp_path)
  for row in logged:
    for key, value in row.items():
      if key != "step":
        assert board[row["step"]][key] == pytest.approx(value, rel=1e-6)


def test_resume_from_older_checkpoint_never_repeats_a_step(tmp_path):
  """Steps 1-40 logged, then a resume from the checkpoint at 20 trains
  21-40 again: metrics.jsonl and TensorBoard hold each step once, with the
  values of the resumed run."""
  run_reporter(tmp_path, [10, 20, 30, 40])
  run_reporter(tmp_path, [30, 40], start_step=20, scale=5.0)
  logged = rows(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in logged] == [10, 20, 30, 40]
  assert [r["train_loss"] for r in logged] == pytest.approx(
      [1 / 10, 1 / 20, 5 / 30, 5 / 40])
  assert board_scalars(tmp_path, "train_loss") == pytest.approx(
      {10: 1 / 10, 20: 1 / 20, 30: 5 / 30, 40: 5 / 40})


def test_resume_before_any_new_log_still_truncates(tmp_path):
  run_reporter(tmp_path, [10, 20, 30])
  Workdir(tmp_path).open_metrics(writes=True, total_steps=30,
                     start_step=10).close()
  assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [10]
  assert board_scalars(tmp_path, "train_loss") == {10: pytest.approx(0.1)}


def test_writes_are_spaced_out_until_flush(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics_lib, "WRITE_INTERVAL_S", 3600.0)
  reporter = Workdir(tmp_path).open_metrics(writes=True, total_steps=3,
                                start_step=0)
  reporter.scalars(1, {"loss": 1.0})   # The first write is at once.
  reporter.scalars(2, {"loss": 2.0})
  assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1]
  assert board_scalars(tmp_path, "loss") == {1: 1.0}
  reporter.flush()
  assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2]
  assert board_scalars(tmp_path, "loss") == {1: 1.0, 2: 2.0}
  reporter.scalars(3, {"loss": 3.0})
  reporter.close()
  assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_only_the_writing_process_writes(tmp_path, monkeypatch):
  monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
  reporter = Workdir(tmp_path / "run").open_metrics(writes=False,
                                total_steps=1, start_step=0)
  reporter.scalars(1, {"loss": 1.0})
  reporter.image(1, "picture", tiny_png(2, 2))
  reporter.flush()
  reporter.close()
  assert list(tmp_path.iterdir()) == []


@pytest.fixture
def no_local_writes(tmp_path, monkeypatch):
  """cwd, HOME and the temporary directory moved to empty folders; yields
  a check that they are still empty."""
  places = [tmp_path / n for n in ("cwd", "home", "tmp")]
  for p in places:
    p.mkdir()
  monkeypatch.chdir(places[0])
  monkeypatch.setenv("HOME", str(places[1]))
  monkeypatch.setattr("tempfile.tempdir", str(places[2]))

  def check():
    written = [str(p) for place in places for p in place.rglob("*")]
    assert not written, written
  yield check


def test_a_failed_write_reaches_the_caller(tmp_path, monkeypatch,
                                           no_local_writes):
  """A full disk when the event file is copied into the workdir: the error
  names that file in one line and reaches the caller of flush(); close()
  then writes nothing more (no second error over the first) and removes
  the local file even so."""
  write_atomic = rundir.write_atomic

  def full_disk(path, data):
    if path.name.startswith("events."):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
    write_atomic(path, data)
  monkeypatch.setattr(rundir, "write_atomic", full_disk)
  reporter = Workdir(tmp_path / "run").open_metrics(writes=True, total_steps=2,
                                start_step=0)
  with pytest.raises(WriteError) as raised:
    reporter.scalars(1, {"loss": 1.0})  # The first write is at once.
  assert str(raised.value).startswith(
      f"cannot write {tmp_path}/run/events.out.tfevents.")
  reporter.scalars(2, {"loss": 2.0})
  reporter.close()
  no_local_writes()
  assert not event_files(tmp_path / "run")


def test_a_lost_bucket_is_one_error_then_no_more_writes(
    gcs_server, gcs_bucket, monkeypatch, no_local_writes):
  """The bucket goes away: the write that finds out (after gcsfs's retries,
  about 30 s) raises one WriteError naming the file; flush() and close()
  after it try nothing more, so the run ends on that first error instead of
  waiting out the retries again and raising from close()."""
  tries = []

  def gone(path, data):
    tries.append(path.name)
    raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
  workdir = f"{gcs_bucket}/run"
  reporter = Workdir(workdir).open_metrics(writes=True, total_steps=3,
                                           start_step=0)
  monkeypatch.setattr(rundir, "write_atomic", gone)
  with pytest.raises(WriteError) as raised:
    reporter.scalars(1, {"loss": 1.0})
  assert str(raised.value) == (
      f"cannot write {workdir}/metrics.jsonl: [Errno 111] Connect call "
      "failed ('127.0.0.1', 1)")
  reporter.scalars(2, {"loss": 2.0})
  reporter.flush()
  reporter.close()
  assert tries == ["metrics.jsonl"]
  no_local_writes()


def test_a_workdir_taken_over_gets_no_more_metrics(tmp_path):
  """Once the workdir's lock is lost, the metrics write nothing more: the
  files are the new holder's."""
  run = Workdir(tmp_path / "run")
  run.take_lock()
  reporter = run.open_metrics(writes=True, total_steps=3, start_step=0)
  reporter.scalars(1, {"loss": 1.0})
  written = (tmp_path / "run" / "metrics.jsonl").read_bytes()
  os.remove(tmp_path / "run" / "lock.json")  # Another run's now.
  with pytest.raises(RunDirError, match="removed or replaced"):
    run.check_lock()
  reporter.scalars(2, {"loss": 2.0})
  reporter.close()
  run.release_lock()
  assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == written


def test_reporter_on_a_bucket_writes_nothing_locally(gcs_server, gcs_bucket,
                                                     no_local_writes,
                                                     tmp_path):
  workdir = f"{gcs_bucket}/run"
  run_reporter(workdir, [10, 20, 30, 40])
  reporter = Workdir(workdir).open_metrics(writes=True, total_steps=40,
                                start_step=20)
  for step in (30, 40):
    reporter.scalars(step, {"train_loss": 5.0 / step, "lr": 0.1})
  png = tiny_png(5, 7)
  reporter.image(40, "confusion", png)
  reporter.close()
  no_local_writes()
  bucket = gcs_bucket[len("gs://"):]
  names = gcs_server.list_objects(bucket)
  events = [n for n in names if n.startswith("run/events.out.tfevents.")]
  assert "run/metrics.jsonl" in names and len(events) == 2, names
  logged = rows(f"{workdir}/metrics.jsonl")
  assert [r["step"] for r in logged] == [10, 20, 30, 40]
  assert logged[-1]["train_loss"] == pytest.approx(5 / 40)
  # TensorBoard reads the bucket's event files as they are.
  copy = tmp_path / "copy"
  copy.mkdir()
  for name in events:
    (copy / pathlib.PurePosixPath(name).name).write_bytes(
        epath.Path(f"{gcs_bucket}/{name}").read_bytes())
  assert board_scalars(copy, "train_loss") == pytest.approx(
      {10: 1 / 10, 20: 1 / 20, 30: 5 / 30, 40: 5 / 40})
  (image,) = accumulator(copy).Images("confusion")
  assert (image.step, image.width, image.height) == (40, 7, 5)
  assert image.encoded_image_string == png


def test_profile_to_a_bucket_goes_through_a_local_temporary(
    gcs_server, gcs_bucket, no_local_writes):
  profile = progress.ProfileWindow(f"{gcs_bucket}/run/profile", num_steps=1,
                                    start_step=0, total_steps=2)
  x = jnp.ones((8, 8))
  for step in (1, 2):
    profile.before_step(step)
    x = x @ x
    profile.after_step(step, x)
  profile.close()
  no_local_writes()   # The temporary trace directory is gone.
  names = gcs_server.list_objects(gcs_bucket[len("gs://"):], "run/profile/")
  assert any(n.endswith(".xplane.pb") for n in names), names
