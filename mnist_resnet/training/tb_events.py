"""TensorBoard event files without TensorFlow.

Accelerator images often lack TensorFlow, and tf.summary cannot write to a
bucket that only gcsfs serves. The format is small: a file of TFRecords, each
an `Event` protobuf, encoded here by hand:

    record = uint64 length, masked crc32c(length), data, masked crc32c(data)
    Event   { wall_time=1 double, step=2 int64, file_version=3 string,
              summary=5 Summary, session_log=7 SessionLog }
    Summary { value=1 repeated Value }
    Value   { tag=1, image=4 Image, tensor=8 TensorProto,
              metadata=9 SummaryMetadata }

Scalars are written as tf.summary.scalar writes them (a float32 scalar tensor
with the "scalars" plugin's metadata), so any reader of the files tf.summary
wrote reads these. Object stores cannot append: the writer keeps the encoded
records in memory and writes the whole file on `flush()`; once a file passes
ROLLOVER_BYTES it moves on to a new one, so a rewrite stays small.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from typing import Mapping

from etils import epath

from mnist_resnet.workdir import rundir

# A file this large is left as it is and the next records go to a new file:
# each flush rewrites the current file whole.
ROLLOVER_BYTES = 4 << 20

FILE_VERSION = b"brain.Event:2"

_DT_FLOAT = 1
_DATA_CLASS_SCALAR = 1
_SESSION_START = 1

# The time in the last file name this process chose. TensorBoard reads a
# directory's files in name order, and a restart marker only drops what it
# read before: each new file's time is past the last one's, also within a
# second (a rollover, a second run in one process).
_last_name_time = 0

try:
  import google_crc32c  # pylint: disable=g-import-not-at-top

  def crc32c(data: bytes) -> int:
    return google_crc32c.value(data)
except ImportError:  # Pure Python: about 0.2 s per MB, each record once.
  def _crc_table() -> list[int]:
    table = []
    for n in range(256):
      c = n
      for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
      table.append(c)
    return table

  _TABLE = _crc_table()

  def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
      crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: the framing TensorBoard's reader checks."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc(length)) + data +
          struct.pack("<I", _masked_crc(data)))


# Protobuf wire format: (field << 3 | wire type), then the value.
def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # Negative int64 values take ten bytes.
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _int(field: int, value: int) -> bytes:
  return _varint(field << 3) + _varint(value)


def _double(field: int, value: float) -> bytes:
  return _varint(field << 3 | 1) + struct.pack("<d", value)


def _bytes(field: int, value: bytes | str) -> bytes:
  if isinstance(value, str):
    value = value.encode()
  return _varint(field << 3 | 2) + _varint(len(value)) + value


def _event(step: int, *fields: bytes) -> bytes:
  """An Event at `step`, now; `fields` are its other fields, encoded."""
  return _double(1, time.time()) + _int(2, step) + b"".join(fields)


def _scalar_value(tag: str, value: float) -> bytes:
  tensor = (_int(1, _DT_FLOAT) + _bytes(2, b"") +
            _bytes(4, struct.pack("<f", value)))
  metadata = _bytes(1, _bytes(1, "scalars")) + _int(4, _DATA_CLASS_SCALAR)
  return _bytes(1, tag) + _bytes(8, tensor) + _bytes(9, metadata)


def _image_value(tag: str, png: bytes, height: int, width: int,
                 channels: int) -> bytes:
  image = (_int(1, height) + _int(2, width) + _int(3, channels) +
           _bytes(4, png))
  return _bytes(1, tag) + _bytes(4, image)


def _summary(values: list[bytes]) -> bytes:
  return _bytes(5, b"".join(_bytes(1, v) for v in values))


def _hostname() -> str:
  # The name goes into a file or object name: keep it to safe characters.
  return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


class EventWriter:
  """Writes one TensorBoard event file (at a time) into `directory`.

  Nothing reaches `directory` before `flush()` or `close()`; each flush
  writes the current file whole (rundir.write_atomic), so the caller chooses
  how often a bucket is written to.
  """

  def __init__(self, directory: epath.Path | str):
    self._directory = epath.Path(directory)
    self._closed = False
    self._start_file()

  @property
  def path(self) -> epath.Path:
    """The file written by the next flush."""
    return self._path

  def _start_file(self) -> None:
    global _last_name_time
    _last_name_time = max(int(time.time()), _last_name_time + 1)
    name = (f"events.out.tfevents.{_last_name_time}.{_hostname()}."
            f"{os.getpid()}.0")
    self._path = self._directory / name
    self._data = bytearray(tfrecord(_event(0, _bytes(3, FILE_VERSION))))
    self._dirty = True

  def _append(self, event: bytes) -> None:
    if self._closed:
      raise ValueError("EventWriter is closed")
    self._data += tfrecord(event)
    self._dirty = True

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One event at `step` holding every scalar of `values`."""
    if values:
      self._append(_event(step, _summary(
          [_scalar_value(k, float(v)) for k, v in values.items()])))

  def image(self, step: int, tag: str, png_bytes: bytes, height: int,
            width: int, *, channels: int = 3) -> None:
    """A PNG image (channels: 1 grey, 3 RGB, 4 RGBA) at `step`."""
    self._append(_event(step, _summary(
        [_image_value(tag, png_bytes, height, width, channels)])))

  def restart(self, step: int) -> None:
    """Marks that the run (re)starts at `step` (a SessionLog START):
    TensorBoard's event reader then drops what earlier files of this
    directory hold for `step` and later, the steps a resume from an older
    checkpoint trains again."""
    self._append(_event(step, _bytes(7, _int(1, _SESSION_START))))

  def flush(self) -> None:
    """Writes the current file whole, if anything was added since."""
    if not self._dirty:
      return
    rundir.write_atomic(self._path, bytes(self._data))
    self._dirty = False
    if len(self._data) >= ROLLOVER_BYTES:
      self._start_file()
      self._dirty = False  # A file with only its version record can wait.

  def close(self) -> None:
    if not self._closed:
      self.flush()
      self._closed = True
