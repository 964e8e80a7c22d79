"""TensorBoard serving a trained run: the scalars of metrics.jsonl and the
confusion-matrix picture, read back through its HTTP API; and
`Reporter.image`, which puts pictures in the event file."""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from PIL import Image
from PIL import UnidentifiedImageError
import pytest

from mnist_resnet.training import pictures
from mnist_resnet.training import report
from mnist_resnet.workdir.workdir import Workdir

# What metrics.jsonl and TensorBoard must agree on.
SCALARS = ("train_loss", "train_accuracy", "learning_rate", "test_accuracy",
           "test_loss", "validation_accuracy")
STARTUP_TIMEOUT_S = 60.0


def png_bytes(mode: str, size: tuple[int, int]) -> bytes:
  buffer = io.BytesIO()
  Image.new(mode, size).save(buffer, format="png")
  return buffer.getvalue()


def event_images(directory: pathlib.Path, tag: str) -> list:
  """The Summary.Image values of `tag` in the event files of `directory`,
  with their steps: [(step, image)]. (TensorBoard's own reader, which
  imports TensorFlow, is the server's, below.)"""
  from tensorboard.compat.proto import event_pb2
  found = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(
          data[offset + 12:offset + 12 + length])
      offset += 16 + length
      found += [(event.step, v.image) for v in event.summary.value
                if v.tag == tag]
  return found


# --- Reporter.image -----------------------------------------------------------


def test_reporter_image_is_written_like_scalars(tmp_path):
  reporter = Workdir(tmp_path).open_metrics(writes=True, total_steps=20,
                                start_step=0)
  first = png_bytes("RGB", (30, 20))
  reporter.image(10, "picture", first)  # Nothing written yet: at once.
  ((step, image),) = event_images(tmp_path, "picture")
  assert (step, image.width, image.height, image.colorspace) == (10, 30, 20,
                                                                 3)
  assert image.encoded_image_string == first
  reporter.image(20, "picture", png_bytes("L", (8, 6)))
  assert len(event_images(tmp_path, "picture")) == 1  # Within the interval.
  reporter.flush()
  assert [(step, i.width, i.height, i.colorspace)
          for step, i in event_images(tmp_path, "picture")] == [
              (10, 30, 20, 3), (20, 8, 6, 1)]
  reporter.close()


def test_reporter_image_only_where_the_reporter_writes(tmp_path):
  reporter = Workdir(tmp_path).open_metrics(writes=False, total_steps=20,
                                start_step=0)
  reporter.image(10, "picture", png_bytes("RGB", (4, 4)))
  reporter.close()
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode, channels", [("L", 1), ("LA", 2), ("RGB", 3),
                                            ("P", 3), ("RGBA", 4)])
def test_reporter_image_size_and_channels(tmp_path, mode, channels):
  reporter = Workdir(tmp_path).open_metrics(writes=True, total_steps=1,
                                start_step=0)
  png = png_bytes(mode, (7, 5))
  reporter.image(1, "picture", png)
  reporter.close()
  ((_, image),) = event_images(tmp_path, "picture")
  assert (image.width, image.height, image.colorspace) == (7, 5, channels)
  assert image.encoded_image_string == png


def test_reporter_image_rejects_other_data(tmp_path):
  reporter = Workdir(tmp_path).open_metrics(writes=True, total_steps=1,
                                start_step=0)
  with pytest.raises(UnidentifiedImageError):
    reporter.image(1, "picture", b"GIF89a" + bytes(30))
  reporter.close()


# --- A real TensorBoard -------------------------------------------------------


@pytest.fixture(scope="module")
def board_run(trained_workdir) -> tuple[pathlib.Path, bytes]:
  """The trained run, and the confusion picture its end wrote beside the
  event file (the one TensorBoard must serve)."""
  return trained_workdir, (trained_workdir / "confusion.png").read_bytes()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def get(base: str, path: str, **query: str) -> bytes:
  url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
  with urllib.request.urlopen(url, timeout=10) as response:
    return response.read()


def get_json(base: str, path: str, **query: str):
  return json.loads(get(base, path, **query))


@pytest.fixture(scope="module")
def board(board_run, tmp_path_factory) -> str:
  """TensorBoard on the run, as a user starts it; its base URL once it
  serves the run's scalars and images. Always stopped afterwards."""
  workdir, _ = board_run
  log_path = tmp_path_factory.mktemp("board_log") / "tensorboard.log"
  port = free_port()
  with open(log_path, "w") as log:
    # Its own process group: TensorBoard starts a data server beside it.
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", f"--logdir={workdir}",
         "--host=127.0.0.1", f"--port={port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  base = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
      if server.poll() is not None:
        pytest.fail(f"tensorboard exited ({server.returncode}):\n"
                    f"{log_path.read_text()[-3000:]}", pytrace=False)
      try:
        scalars = get_json(base, "/data/plugin/scalars/tags")
        images = get_json(base, "/data/plugin/images/tags")
        if ("train_loss" in scalars.get(".", {}) and
            report.CONFUSION_TAG in images.get(".", {})):
          break
      except (urllib.error.URLError, ConnectionError, ValueError):
        pass  # Not listening yet, or still loading the run.
      if time.monotonic() > deadline:
        pytest.fail(f"tensorboard did not serve the run within "
                    f"{STARTUP_TIMEOUT_S:.0f} s:\n"
                    f"{log_path.read_text()[-3000:]}", pytrace=False)
      time.sleep(0.25)
    yield base
  finally:
    stop(server)


def stop(server: subprocess.Popen) -> None:
  """Ends TensorBoard and its data server (their process group)."""
  for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
    try:
      os.killpg(server.pid, sig)
    except ProcessLookupError:
      return
    try:
      server.wait(wait_s)
      return
    except subprocess.TimeoutExpired:
      continue


def test_tensorboard_serves_the_runs_scalars(board, board_run):
  workdir, _ = board_run
  assert get_json(board, "/data/runs") == ["."]
  rows = [json.loads(line)
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  for tag in SCALARS:
    expected = {r["step"]: r[tag] for r in rows if tag in r}
    assert expected, tag
    served = get_json(board, "/data/plugin/scalars/scalars", run=".",
                      tag=tag)
    got = {step: value for _, step, value in served}
    assert sorted(got) == sorted(expected), tag
    for step, value in expected.items():
      # The event file holds float32.
      assert got[step] == pytest.approx(value, rel=1e-6), (tag, step)


def test_tensorboard_serves_the_confusion_picture(board, board_run):
  _, png = board_run
  tags = get_json(board, "/data/plugin/images/tags")["."]
  assert tags[report.CONFUSION_TAG]["samples"] == 1
  (entry,) = get_json(board, "/data/plugin/images/images", run=".",
                      tag=report.CONFUSION_TAG, sample="0")
  assert entry["step"] == 60
  served = get(board, "/data/plugin/images/individualImage?" +
               entry["query"])
  assert served == png
  Image.open(io.BytesIO(served)).verify()
  image = Image.open(io.BytesIO(served))
  assert (image.format, image.size) == ("PNG", pictures.CONFUSION_SIZE)
