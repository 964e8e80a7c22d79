"""Tests for mnist_resnet.data.idx: round trips, one crafted file per fault."""

import gzip
import io
import os
import pathlib
import stat
import struct
import tracemalloc

import numpy as np
import pytest

from mnist_resnet.core import errors
from mnist_resnet.data import idx

DTYPES = (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64)


def _sample(dtype, shape, seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if np.issubdtype(dtype, np.floating):
    return rng.standard_normal(shape).astype(dtype)
  info = np.iinfo(dtype)
  return rng.integers(info.min, info.max, size=shape, endpoint=True,
                      dtype=dtype)


def _write_bytes(path: pathlib.Path, payload: bytes, gz: bool = False):
  path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
  return path


def _header(code: int, shape) -> bytes:
  return bytes([0, 0, code, len(shape)]) + struct.pack(
      f">{len(shape)}I", *shape)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (1, 2, 1, 3, 2),
                                   (0, 28, 28)])
def test_round_trip(tmp_path, dtype, shape, suffix):
  array = _sample(dtype, shape)
  path = tmp_path / f"a.idx{suffix}"
  idx.write_idx(path, array)
  back = idx.read_idx(path)
  assert back.dtype == np.dtype(dtype)
  assert back.dtype.isnative
  assert back.shape == shape
  np.testing.assert_array_equal(back, array)
  header = idx.read_idx_header(path)
  assert header.dtype == np.dtype(dtype)
  assert header.shape == shape
  assert header.header_size == 4 + 4 * len(shape)
  assert header.data_size == array.nbytes
  # Only the final file is left: no temporary beside it.
  assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_many_dims_round_trip(tmp_path):
  array = np.arange(6, dtype=np.int16).reshape((1,) * 62 + (2, 3))
  path = tmp_path / "deep.idx"
  idx.write_idx(path, array)
  np.testing.assert_array_equal(idx.read_idx(path), array)


def test_bytes_on_disk_are_big_endian(tmp_path):
  path = tmp_path / "be.idx"
  idx.write_idx(path, np.array([1, -2], dtype=np.int32))
  assert path.read_bytes() == (b"\x00\x00\x0c\x01\x00\x00\x00\x02"
                               b"\x00\x00\x00\x01\xff\xff\xff\xfe")


def test_reads_big_endian_input_arrays(tmp_path):
  array = np.array([[1.5, -2.25]], dtype=">f8")
  path = tmp_path / "f.idx.gz"
  idx.write_idx(path, array)
  np.testing.assert_array_equal(idx.read_idx(path), array)


def test_gzip_detected_by_content_not_name(tmp_path):
  array = _sample(np.uint8, (4, 5))
  raw = _write_bytes(tmp_path / "a.gz",
                     _header(0x08, array.shape) + array.tobytes())
  np.testing.assert_array_equal(idx.read_idx(raw), array)
  gz = _write_bytes(tmp_path / "b.idx",
                    _header(0x08, array.shape) + array.tobytes(), gz=True)
  np.testing.assert_array_equal(idx.read_idx(gz), array)


def test_write_is_deterministic(tmp_path):
  array = _sample(np.uint8, (10, 10))
  idx.write_idx(tmp_path / "a.gz", array)
  idx.write_idx(tmp_path / "b.gz", array)
  assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_write_rejects_what_idx_cannot_store(tmp_path):
  with pytest.raises(ValueError, match="dtype"):
    idx.write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
  with pytest.raises(ValueError, match="dimensions"):
    idx.write_idx(tmp_path / "x", np.zeros((), dtype=np.uint8))
  assert list(tmp_path.iterdir()) == []


# Each case: (name, bytes of the uncompressed file, regex the error matches).
_GOOD = _header(0x08, (2, 3)) + bytes(range(6))
_BAD_CASES = [
    ("empty", b"", "too short"),
    ("short_magic", b"\x00\x00", "too short"),
    ("bad_magic", b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00",
     "magic"),
    ("bad_dtype", b"\x00\x00\x0a\x01" + struct.pack(">I", 1) + b"\x00",
     "dtype code 0x0A"),
    ("zero_dims", b"\x00\x00\x08\x00\x05", "0 dimensions"),
    ("too_many_dims", b"\x00\x00\x08\x41" + struct.pack(">65I", *[1] * 65)
     + b"\x00", "65 dimensions"),
    ("truncated_dims", b"\x00\x00\x08\x03" + struct.pack(">I", 2),
     "truncated"),
    ("short_data", _GOOD[:-1], "promises 6 data bytes"),
    ("trailing_bytes", _GOOD + b"\x00\x00", "promises 6 data bytes .* more|"
     "trailing"),
    ("int32_short", _header(0x0C, (2,)) + b"\x00" * 7,
     "promises 8 data bytes"),
]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("name,payload,pattern", _BAD_CASES,
                         ids=[c[0] for c in _BAD_CASES])
def test_malformed_files_raise(tmp_path, gz, name, payload, pattern):
  path = _write_bytes(tmp_path / f"{name}.idx", payload, gz=gz)
  with pytest.raises(idx.IdxError, match=pattern) as info:
    idx.read_idx(path)
  message = str(info.value)
  assert str(path) in message
  assert "\n" not in message
  assert isinstance(info.value, errors.DataError)


def test_header_errors_name_the_file(tmp_path):
  path = _write_bytes(tmp_path / "h.idx", b"\x00\x00\x07\x01")
  with pytest.raises(idx.IdxError, match="h.idx: unknown idx dtype"):
    idx.read_idx_header(path)


def test_missing_file(tmp_path):
  path = tmp_path / "nope.idx"
  with pytest.raises(idx.IdxError, match="nope.idx: cannot read"):
    idx.read_idx(path)


def _good_gz(tmp_path, shape=(50, 28, 28)) -> tuple[pathlib.Path, bytes]:
  array = _sample(np.uint8, shape)
  path = tmp_path / "good.idx.gz"
  idx.write_idx(path, array)
  return path, path.read_bytes()


def test_truncated_gzip(tmp_path):
  path, blob = _good_gz(tmp_path)
  for cut in (len(blob) - 8, len(blob) // 2, 30):
    path.write_bytes(blob[:cut])
    with pytest.raises(idx.IdxError, match=str(path)):
      idx.read_idx(path)


def test_truncated_gzip_with_plausible_trailer(tmp_path):
  """Cut deflate data but keep a trailer that matches: inflating must fail."""
  path, blob = _good_gz(tmp_path)
  path.write_bytes(blob[:len(blob) // 2] + blob[-8:])
  with pytest.raises(idx.IdxError, match=f"{path}: .*gzip"):
    idx.read_idx(path)


def test_corrupt_gzip_flipped_byte(tmp_path):
  path, blob = _good_gz(tmp_path)
  # Flip bytes in the middle of the deflate data (not the header or trailer):
  # either inflating fails or the CRC-32 check does; never silent garbage.
  for offset in (len(blob) // 3, len(blob) // 2, len(blob) - 20):
    corrupt = bytearray(blob)
    corrupt[offset] ^= 0x55
    path.write_bytes(bytes(corrupt))
    with pytest.raises(idx.IdxError, match=str(path)):
      idx.read_idx(path)


def test_crc_mismatch_detected(tmp_path):
  path, blob = _good_gz(tmp_path)
  corrupt = bytearray(blob)
  corrupt[-8] ^= 0xFF  # CRC-32 field of the trailer.
  path.write_bytes(bytes(corrupt))
  with pytest.raises(idx.IdxError, match=f"{path}: .*(check|corrupt)"):
    idx.read_idx(path)


def test_garbage_after_gzip_stream(tmp_path):
  path, blob = _good_gz(tmp_path)
  path.write_bytes(blob + b"garbage!")
  with pytest.raises(idx.IdxError, match=str(path)):
    idx.read_idx(path)


def test_second_gzip_member_rejected(tmp_path):
  path, blob = _good_gz(tmp_path)
  path.write_bytes(blob + gzip.compress(b"\x00" * 10))
  with pytest.raises(idx.IdxError, match=str(path)):
    idx.read_idx(path)


class _CountingFileIO(io.FileIO):
  """A file that adds up the bytes read from it."""
  total = 0

  def readinto(self, buffer):
    n = super().readinto(buffer)
    _CountingFileIO.total += n or 0
    return n

  def readall(self):
    data = super().readall()
    _CountingFileIO.total += len(data)
    return data


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_huge_header_fails_fast_without_allocating(tmp_path, gz, monkeypatch):
  # 2^31 images of 28x28 promised, about 10 MB actually present.
  payload = _header(0x08, (2**31, 28, 28)) + np.random.default_rng(0).integers(
      0, 256, 10_000_000, dtype=np.uint8).tobytes()
  path = _write_bytes(tmp_path / "huge.idx", payload, gz=gz)
  del payload
  # "Fast" without a clock: the header is rejected after reading a tiny part
  # of the file (a buffer or two), and nothing near its size is allocated.
  _CountingFileIO.total = 0
  monkeypatch.setattr(idx, "open", lambda p, mode="rb": io.BufferedReader(
      _CountingFileIO(p, mode)), raising=False)
  tracemalloc.start()
  try:
    with pytest.raises(idx.IdxError, match=f"{path}: header promises "
                       f"{2**31 * 784} data bytes"):
      idx.read_idx(path)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert 0 < _CountingFileIO.total < 2**20
  assert peak < 2**20


def test_gzip_trailer_mismatch_fails_before_inflating(tmp_path):
  """A header promising slightly more than the stream holds (plausible ratio)
  is caught by the ISIZE trailer without inflating the whole file."""
  array = _sample(np.uint8, (100, 28, 28))
  payload = _header(0x08, (101, 28, 28)) + array.tobytes()
  path = _write_bytes(tmp_path / "more.idx", payload, gz=True)
  with pytest.raises(idx.IdxError, match="gzip trailer records"):
    idx.read_idx(path)


def test_short_raw_file_message(tmp_path):
  path = _write_bytes(tmp_path / "images.idx",
                      _header(0x08, (60000, 28, 28)) + bytes(1000))
  with pytest.raises(idx.IdxError) as info:
    idx.read_idx(path)
  assert str(info.value) == (f"{path}: header promises 47040000 data bytes "
                             "but the file holds 1000")


@pytest.mark.parametrize("name", ["plain-idx1-ubyte", "packed-idx1-ubyte.gz"])
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_mode_of_new_files(tmp_path, name, umask):
  """0o666 less the umask, as any new file; not mkstemp's 0600."""
  previous = os.umask(umask)
  try:
    idx.write_idx(tmp_path / name, np.arange(5, dtype=np.uint8))
  finally:
    os.umask(previous)
  assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
  assert [p.name for p in tmp_path.iterdir()] == [name]  # No temporary left.
