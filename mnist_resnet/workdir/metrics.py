"""A run's metrics: metrics.jsonl and TensorBoard event files (written by
tensorboardX, no TensorFlow needed), and the console. Only one process
writes files (process 0 of a multi-host run); the others log to the
console only. On an interactive terminal a progress bar shows the step.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import sys
import tempfile
import time
from typing import Any
from typing import Callable
from typing import Mapping

from absl import logging
from etils import epath
import PIL.Image
from tensorboardX import event_file_writer
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2
from tensorboardX.proto import tensor_pb2

from mnist_resnet.core import files
from mnist_resnet.core.errors import WriteError
from mnist_resnet.core.errors import one_line
from mnist_resnet.workdir import rundir

# metrics.jsonl and the event file are rewritten whole at most this often
# while steps are logged: Cloud Storage takes about one write per second to
# an object, and each rewrite costs the file's size. The same policy holds
# for local files (one code path); what it delays is at most the rows after
# the latest checkpoint, which a resume drops anyway (flush() at each save).
WRITE_INTERVAL_S = 10.0

# An event file this large is left as it is and the next events go to a new
# file: each flush rewrites the current file whole.
ROLLOVER_BYTES = 4 << 20

# Event file names hold the second they were started in (tensorboardX's
# name), then this number: TensorBoard reads a directory's files in name
# order, and a restart marker only drops what it read before.
_FILE_NUMBERS = itertools.count()


class Reporter:
  """Writes scalars for one run. Create one per process; only `writes` do.

  metrics.jsonl starts as the rows of steps <= `start_step` that it already
  holds (a resume from an older checkpoint trains the later steps
  again, and must not repeat them), and is written whole, like the event
  file: object stores cannot append. Both are written at most every
  WRITE_INTERVAL_S, and on `flush()` (the loop calls it at each checkpoint)
  and `close()`. `check`, if given, runs before each write and raises once
  the workdir is no longer this run's (its lock lost).

  After a write fails, or `check` or `stop_writing()` says so, nothing more
  is written: the first error is the one reported, and a bucket that went
  away does not make every later write wait out its retries again.
  """

  def __init__(self, metrics_file: epath.Path, events_dir: epath.Path, *,
               writes: bool, total_steps: int, start_step: int,
               check: Callable[[], None] | None = None):
    self.writes = writes
    self._bar = None
    self._events = None
    self._rows: list[str] = []
    self._dirty = False
    self._stopped = False
    self._check = check
    self._last_write = -math.inf
    if writes:
      self._jsonl = metrics_file
      rows = read_metrics(metrics_file) or []
      kept = [row for row in rows if row["step"] <= start_step]
      self._rows = [json.dumps(row) + "\n" for row in kept]
      self._dirty = len(kept) < len(rows)
      self._events = _EventFile(events_dir)
      # The restart marker: TensorBoard's event reader (purge_orphaned_data,
      # on by default) then drops what older event files say about the steps
      # this run trains again.
      self._events.add(start_step + 1, session_log=event_pb2.SessionLog(
          status=event_pb2.SessionLog.START))
      if sys.stderr.isatty():
        import tqdm  # pylint: disable=g-import-not-at-top
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step,
                              unit="step", dynamic_ncols=True)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Records one logged step: TensorBoard, one JSON line, one log line."""
    values = {k: float(v) for k, v in values.items()}
    if self._events is not None:
      self._rows.append(json.dumps({"step": step, **values}) + "\n")
      self._events.add(step, summary=_scalar_summary(values))
      self._changed()
    text = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    if self._bar is not None:
      self._bar.write(f"step {step}: {text}")
    else:
      logging.info("step %d: %s", step, text)

  def image(self, step: int, tag: str, png_bytes: bytes) -> None:
    """Records a PNG picture (a confusion matrix) for TensorBoard's images
    tab; it reaches the event file as scalars do."""
    if self._events is None:
      return
    self._events.add(step, summary=summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, image=_image(png_bytes))]))
    self._changed()

  def _changed(self) -> None:
    """Something new to write: written now if the last write is older than
    WRITE_INTERVAL_S, else at the next flush."""
    self._dirty = True
    if time.monotonic() - self._last_write >= WRITE_INTERVAL_S:
      self.flush()

  def flush(self) -> None:
    """Writes metrics.jsonl and the event file, if anything is new."""
    if self._events is None or not self._dirty or self._stopped:
      return
    try:
      if self._check is not None:
        self._check()
      _write(self._jsonl, "".join(self._rows))
      self._events.flush()
    except Exception:
      self._stopped = True
      raise
    self._dirty = False
    self._last_write = time.monotonic()

  def stop_writing(self) -> None:
    """Nothing more reaches the files: the workdir is another run's now."""
    self._stopped = True

  def progress(self, step: int) -> None:
    if self._bar is not None:
      self._bar.n = step
      self._bar.refresh()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    try:
      self.flush()
    finally:
      if self._events is not None:
        self._events.close()
        self._events = None


def read_metrics(path: epath.Path) -> list[dict[str, Any]] | None:
  """The rows of a metrics.jsonl; None if there is no such file. A line that
  is not a JSON object with a step (cut off by a crash, or damaged) is
  skipped with a warning."""
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return None
  rows = []
  for line in data.decode("utf-8", errors="replace").splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    if isinstance(row, dict) and isinstance(row.get("step"), int):
      rows.append(row)
    elif line.strip():
      logging.warning("%s: skipped a line that is not a metrics row: %.80r",
                      path, line)
  return rows


class _EventFile:
  """TensorBoard's event file of one run, written by tensorboardX.

  Nothing reaches `directory` before `flush()`, which writes the current
  file whole (rundir.write_atomic): the caller chooses how often a bucket
  is written to. `close()` deletes the local copy.
  """

  def __init__(self, directory: epath.Path):
    # Not tensorboardX's gs:// (google-cloud-storage beside the workdir's
    # gcsfs, uploading again from __del__): a local file, copied on flush().
    self._directory = directory
    self._local = tempfile.TemporaryDirectory(prefix="mnist_resnet_events_")
    self._start_file()

  def _start_file(self) -> None:
    for name in os.listdir(self._local.name):  # The last file, copied.
      os.remove(os.path.join(self._local.name, name))
    # EventsWriter writes at once; SummaryWriter queues events to a thread,
    # and its flush() does not wait for the queue.
    self._writer = event_file_writer.EventsWriter(
        os.path.join(self._local.name, "events"),
        filename_suffix=f".{os.getpid()}.{next(_FILE_NUMBERS):04d}")
    (self._name,) = os.listdir(self._local.name)

  def add(self, step: int, **fields: Any) -> None:
    """One event at `step`, now; `fields` are the Event's other fields."""
    self._writer.write_event(
        event_pb2.Event(wall_time=time.time(), step=step, **fields))

  def flush(self) -> None:
    self._writer.flush()
    with open(os.path.join(self._local.name, self._name), "rb") as f:
      data = f.read()
    _write(self._directory / self._name, data)
    if len(data) >= ROLLOVER_BYTES:
      self._writer.close()
      self._start_file()

  def close(self) -> None:
    try:
      self._writer.close()
    finally:
      self._local.cleanup()


def _write(path: epath.Path, data: str | bytes) -> None:
  """rundir.write_atomic; a failure a user fixes (a full disk, a bucket
  that cannot be reached) as one WriteError naming the file."""
  try:
    rundir.write_atomic(path, data)
  except Exception as e:  # pylint: disable=broad-except
    if files.is_remote(path):
      # gcsfs gives up after its retries (about 30 s) with whatever the
      # transport raised: the bucket is gone, unreachable or refuses us.
      raise WriteError(f"cannot write {path}: "
                       f"{one_line(e, limit=300)}") from None
    failure = files.write_failure(e)
    if failure is None:
      raise
    raise failure from None


def _scalar_summary(values: Mapping[str, float]) -> summary_pb2.Summary:
  """Scalars as tf.summary.scalar writes them, a float32 tensor with the
  "scalars" plugin's metadata (tensorboardX's add_scalar writes a
  simple_value, which readers of tf.summary's files skip)."""
  metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(
          plugin_name="scalars"))
  return summary_pb2.Summary(value=[
      summary_pb2.Summary.Value(
          tag=tag, metadata=metadata,
          tensor=tensor_pb2.TensorProto(dtype="DT_FLOAT", float_val=[value]))
      for tag, value in values.items()])


_PALETTE_CHANNELS = {"P": 3, "PA": 4}  # Palette images show in colour.


def _image(png: bytes) -> summary_pb2.Summary.Image:
  """A PNG as an image summary. Pillow reads the header only; the bytes go
  in as they are (tensorboardX's add_image would encode the pixels anew)."""
  with PIL.Image.open(io.BytesIO(png), formats=["PNG"]) as image:
    width, height = image.size
    channels = _PALETTE_CHANNELS.get(image.mode, len(image.getbands()))
  return summary_pb2.Summary.Image(height=height, width=width,
                                   colorspace=channels,
                                   encoded_image_string=png)


def _fmt(v: float) -> str:
  return f"{v:.5g}"
