"""Reporter, metrics.jsonl and the TensorFlow-free TensorBoard writer, on a
local directory and on a bucket of the local Cloud Storage server."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import zlib

from etils import epath
import jax.numpy as jnp
import pytest
from test_train import tensorboard_scalars

from conftest import REPO_ROOT
from mnist_resnet.training import reporting
from mnist_resnet.training import tb_events


def tiny_png(height: int, width: int) -> bytes:
  """An RGB PNG, encoded with zlib alone."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data)))
  rows = b"".join(
      b"\0" + b"".join(bytes((x * 40, y * 40, 200)) for x in range(width))
      for y in range(height))
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
          chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


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
  reporter = reporting.Reporter(workdir, writes=True, total_steps=max(steps),
                                start_step=start_step)
  for step in steps:
    reporter.scalars(step, {"train_loss": scale / step, "lr": 0.1})
  reporter.close()


def test_event_file_scalars(tmp_path):
  writer = tb_events.EventWriter(epath.Path(tmp_path))
  writer.scalars(1, {"loss": 2.5, "accuracy": 0.25})
  writer.scalars(2, {"loss": -1e-3})
  writer.close()
  (path,) = tmp_path.glob("events.out.tfevents.*")
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
  writer = tb_events.EventWriter(epath.Path(tmp_path))
  png = tiny_png(3, 4)
  writer.image(2, "confusion", png, height=3, width=4)
  writer.scalars(2, {"loss": 1.0})
  writer.close()
  (image,) = accumulator(tmp_path).Images("confusion")
  assert (image.step, image.height, image.width) == (2, 3, 4)
  assert image.encoded_image_string == png
  assert board_scalars(tmp_path, "loss") == {2: 1.0}


def test_first_record_is_the_file_version(tmp_path):
  from tensorboard.compat.proto import event_pb2
  writer = tb_events.EventWriter(epath.Path(tmp_path))
  writer.scalars(5, {"x": 1.0})
  writer.close()
  data = next(tmp_path.glob("events.out.tfevents.*")).read_bytes()
  (length,) = struct.unpack("<Q", data[:8])
  event = event_pb2.Event.FromString(data[12:12 + length])
  assert event.file_version == "brain.Event:2"


def test_crc32c_known_value():
  # The check value of CRC-32C (RFC 3720).
  assert tb_events.crc32c(b"123456789") == 0xE3069283


def test_importing_writes_without_tensorflow(tmp_path):
  """An accelerator image without TensorFlow, TensorBoard or google-crc32c
  writes event files TensorBoard reads (its reader checks the CRCs)."""
  script = textwrap.dedent(f"""
      import sys
      BLOCKED = ("tensorflow", "tensorboard", "google_crc32c")
      class Block:
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
      sys.meta_path.insert(0, Block())
      from etils import epath
      from mnist_resnet.training import tb_events
      w = tb_events.EventWriter(epath.Path({str(tmp_path)!r}))
      w.scalars(7, {{"loss": 0.5}})
      w.image(7, "img", b"not-a-png", height=1, width=1)
      w.close()
      loaded = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
      assert not loaded, loaded
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert board_scalars(tmp_path, "loss") == {7: 0.5}
  assert accumulator(tmp_path).Images("img")[0].encoded_image_string == (
      b"not-a-png")


def test_rollover_starts_a_new_file(tmp_path, monkeypatch):
  monkeypatch.setattr(tb_events, "ROLLOVER_BYTES", 2000)
  writer = tb_events.EventWriter(epath.Path(tmp_path))
  for step in range(1, 101):
    writer.scalars(step, {"loss": float(step)})
    writer.flush()
  writer.close()
  files = list(tmp_path.glob("events.out.tfevents.*"))
  # About 80 bytes a step: a file closes at the first flush past 2000.
  assert len(files) >= 3
  assert all(f.stat().st_size < 2100 for f in files)
  assert board_scalars(tmp_path, "loss") == {s: s for s in range(1, 101)}


def test_later_files_sort_after_earlier_ones(tmp_path):
  """TensorBoard reads files in name order; a restart marker only drops
  what it read before. Writers started within one second keep that order."""
  paths = []
  for _ in range(12):
    writer = tb_events.EventWriter(epath.Path(tmp_path))
    paths.append(writer.path.name)
    writer.close()
  assert sorted(paths) == paths and len(set(paths)) == 12


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
  reporting.Reporter(tmp_path, writes=True, total_steps=30,
                     start_step=10).close()
  assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [10]


def test_writes_are_spaced_out_until_flush(tmp_path, monkeypatch):
  monkeypatch.setattr(reporting, "WRITE_INTERVAL_S", 3600.0)
  reporter = reporting.Reporter(tmp_path, writes=True, total_steps=3,
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


def test_only_the_writing_process_writes(tmp_path):
  reporter = reporting.Reporter(tmp_path / "run", writes=False,
                                total_steps=1, start_step=0)
  reporter.scalars(1, {"loss": 1.0})
  reporter.flush()
  reporter.close()
  assert not (tmp_path / "run").exists()


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


def test_reporter_on_a_bucket_writes_nothing_locally(gcs_server, gcs_bucket,
                                                     no_local_writes,
                                                     tmp_path):
  workdir = f"{gcs_bucket}/run"
  run_reporter(workdir, [10, 20, 30, 40])
  run_reporter(workdir, [30, 40], start_step=20, scale=5.0)
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


def test_profile_to_a_bucket_goes_through_a_local_temporary(
    gcs_server, gcs_bucket, no_local_writes):
  profile = reporting.ProfileWindow(f"{gcs_bucket}/run/profile", num_steps=1,
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
