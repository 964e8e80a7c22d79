"""Read and write idx files, the format the MNIST database ships in.

An idx file is a 4-byte magic number (two zero bytes, a dtype code, the number
of dimensions), one big-endian uint32 per dimension, then the elements in
C order and big-endian byte order. Files may be gzip-compressed.

Everything the header promises is checked against the file BEFORE any buffer of
the promised size is allocated: a corrupt or hostile header claiming billions
of images in a 10 MB file fails in microseconds instead of exhausting memory.
Compression is detected from the content (gzip magic bytes), not from the name,
because browsers often decompress `.gz` downloads while keeping the name.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pathlib
import struct
from typing import Iterator
from typing import NamedTuple
from typing import Union
import zlib

import numpy as np

from mnist_resnet.core import files
from mnist_resnet.core.errors import DataError
from mnist_resnet.core.errors import one_line

PathLike = Union[str, os.PathLike]

# idx dtype code -> numpy dtype as stored in the file (big-endian).
_CODE_TO_DTYPE = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_NATIVE_TO_CODE = {dt.newbyteorder("="): code
                   for code, dt in _CODE_TO_DTYPE.items()}

_GZIP_MAGIC = b"\x1f\x8b"
# Deflate cannot expand data by more than about 1032:1, so a gzip file of C
# bytes cannot hold much more than 1032 * C uncompressed bytes; anything larger
# is impossible whatever the (possibly multi-member) gzip trailer says.
_MAX_DEFLATE_RATIO = 1032
_READ_SIZE = 1 << 20
# The format allows up to 255 dimensions but numpy arrays hold at most 64
# (32 before numpy 2); a deeper header cannot be returned, so it is rejected
# with that reason rather than with numpy's error after reading.
_MAX_DIMS = 64 if int(np.__version__.split(".")[0]) >= 2 else 32


class IdxError(DataError):
  """An idx file is malformed, truncated or does not match its header."""


class IdxHeader(NamedTuple):
  """What an idx file's header declares.

  `dtype` is the native-byte-order dtype `read_idx` returns (comparable with
  `np.uint8`, `np.int32`, ...); `header_size` counts the magic and dimension
  bytes, so the data starts at that offset of the uncompressed stream.
  """
  dtype: np.dtype
  shape: tuple[int, ...]
  header_size: int

  @property
  def data_size(self) -> int:
    """Number of data bytes the header promises."""
    return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


def _parse_magic(path: PathLike, magic: bytes) -> tuple[np.dtype, int]:
  """Validates the 4-byte magic; returns (stored dtype, number of dims)."""
  if len(magic) < 4:
    raise IdxError(f"{path}: {len(magic)} bytes is too short for an idx "
                   "header (needs at least 4)")
  if magic[0] != 0 or magic[1] != 0:
    raise IdxError(f"{path}: bad magic number 0x{magic.hex()}: an idx file "
                   "starts with two zero bytes")
  code, ndim = magic[2], magic[3]
  if code not in _CODE_TO_DTYPE:
    known = ", ".join(f"0x{c:02X}" for c in _CODE_TO_DTYPE)
    raise IdxError(f"{path}: unknown idx dtype code 0x{code:02X} (known: "
                   f"{known})")
  # The format allows 1..255 dimensions. A zero-dimension header would mean a
  # single scalar; no producer writes that, and it is what a zeroed or
  # unrelated file looks like, so it is rejected as corrupt.
  if ndim == 0:
    raise IdxError(f"{path}: header declares 0 dimensions (an idx file has "
                   "1 to 255)")
  if ndim > _MAX_DIMS:
    raise IdxError(f"{path}: header declares {ndim} dimensions; numpy arrays "
                   f"hold at most {_MAX_DIMS}")
  return _CODE_TO_DTYPE[code], ndim


def _parse_dims(path: PathLike, ndim: int, dims: bytes) -> tuple[int, ...]:
  if len(dims) < 4 * ndim:
    raise IdxError(f"{path}: header declares {ndim} dimensions but is "
                   f"truncated after {len(dims) // 4}")
  return struct.unpack(f">{ndim}I", dims)


def _read_header(path: PathLike, stream) -> IdxHeader:
  stored, ndim = _parse_magic(path, stream.read(4))
  shape = _parse_dims(path, ndim, stream.read(4 * ndim))
  return IdxHeader(stored.newbyteorder("="), tuple(shape), 4 + 4 * ndim)


def _is_gzip(path: PathLike) -> bool:
  with open(path, "rb") as f:
    return f.read(2) == _GZIP_MAGIC


def _wrap_os_error(path: PathLike, err: OSError) -> IdxError:
  reason = err.strerror or str(err) or type(err).__name__
  return IdxError(f"{path}: cannot read: {reason}")


def read_idx_header(path: PathLike) -> IdxHeader:
  """Reads and validates only the header (cheap, even for gzip files)."""
  with _file_errors(path, "corrupt gzip stream in the header"):
    if _is_gzip(path):
      with gzip.open(path, "rb") as f:
        return _read_header(path, f)
    with open(path, "rb") as f:
      return _read_header(path, f)


@contextlib.contextmanager
def _file_errors(path: pathlib.Path, gzip_fault: str) -> Iterator[None]:
  """Turns gzip and OS errors while reading `path` into IdxError."""
  try:
    yield
  except IdxError:
    raise
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise IdxError(f"{path}: {gzip_fault}: {one_line(e)}") from e
  except OSError as e:
    raise _wrap_os_error(path, e) from e


def _read_raw(path: PathLike) -> tuple[IdxHeader, np.ndarray]:
  with open(path, "rb") as f:
    header = _read_header(path, f)
    file_size = os.fstat(f.fileno()).st_size
    available = file_size - header.header_size
    if available < header.data_size:
      raise IdxError(f"{path}: header promises {header.data_size} data bytes "
                     f"but the file holds {max(available, 0)}")
    if available > header.data_size:
      raise IdxError(f"{path}: header promises {header.data_size} data bytes "
                     f"but the file holds {available} "
                     f"({available - header.data_size} trailing bytes)")
    buf = np.empty(header.data_size, dtype=np.uint8)
    got = f.readinto(memoryview(buf))
    if got != header.data_size:  # The file shrank while being read.
      raise IdxError(f"{path}: header promises {header.data_size} data bytes "
                     f"but only {got} could be read")
  return header, buf


def _read_gzip(path: PathLike) -> tuple[IdxHeader, np.ndarray]:
  with open(path, "rb") as raw:
    compressed_size = os.fstat(raw.fileno()).st_size
    with gzip.GzipFile(fileobj=raw, mode="rb") as f:
      header = _read_header(path, f)
    total = header.header_size + header.data_size
    if total > _MAX_DEFLATE_RATIO * compressed_size + 1024:
      raise IdxError(
          f"{path}: header promises {header.data_size} data bytes, more "
          f"than a {compressed_size}-byte gzip file can hold")
    raw.seek(max(compressed_size - 4, 0))
    trailer = raw.read(4)
    isize = struct.unpack("<I", trailer)[0] if len(trailer) == 4 else None
    if isize != total % (1 << 32):
      raise IdxError(
          f"{path}: header promises {header.data_size} data bytes "
          f"({total} with the header) but the gzip trailer records {isize} "
          "uncompressed bytes (mod 2^32): the file is truncated, corrupt "
          "or not a single gzip stream")

    # The size is plausible: inflate once more, straight into one buffer.
    # zlib (not GzipFile) because it inflates large chunks about twice as
    # fast, and with wbits=31 it still checks the CRC-32 and length trailer.
    buf = np.empty(header.data_size, dtype=np.uint8)
    view = memoryview(buf)
    inflater = zlib.decompressobj(wbits=31)
    produced = 0  # Uncompressed bytes seen so far, header included.
    raw.seek(0)
    while not inflater.eof:
      pending = raw.read(_READ_SIZE)
      if not pending:
        raise IdxError(f"{path}: truncated gzip stream: it ends after "
                       f"{max(produced - header.header_size, 0)} of "
                       f"{header.data_size} data bytes")
      while pending and not inflater.eof:
        # One byte more than still expected, so excess data is noticed.
        out = inflater.decompress(pending, total - produced + 1)
        pending = inflater.unconsumed_tail
        if produced + len(out) > total:
          raise IdxError(f"{path}: header promises {header.data_size} data "
                         "bytes but the gzip stream holds more")
        skip = max(header.header_size - produced, 0)
        if skip < len(out):
          start = produced + skip - header.header_size
          view[start:start + len(out) - skip] = out[skip:]
        produced += len(out)
    if produced != total:
      raise IdxError(f"{path}: header promises {header.data_size} data bytes "
                     "but the gzip stream holds "
                     f"{max(produced - header.header_size, 0)}")
    if inflater.unused_data or raw.read(1):
      raise IdxError(f"{path}: unexpected bytes after the end of the gzip "
                     "stream")
  return header, buf


def read_idx(path: PathLike) -> np.ndarray:
  """Reads an idx file (raw or gzip) into a native-byte-order array.

  Raises:
    IdxError: the file is unreadable, malformed, truncated, has trailing bytes
      or fails its gzip integrity check; the message names the file.
  """
  with _file_errors(path, "truncated or corrupt gzip stream"):
    if _is_gzip(path):
      header, buf = _read_gzip(path)
    else:
      header, buf = _read_raw(path)
  stored = header.dtype.newbyteorder(">")
  array = buf.view(stored).reshape(header.shape)
  if stored.itemsize > 1:
    array = array.astype(header.dtype)  # Swap to native order once.
  else:
    array = array.view(header.dtype)
  return array


def write_idx(path: PathLike, array: np.ndarray, *,
              compresslevel: int = 6) -> None:
  """Writes `array` as an idx file, gzip-compressed when `path` ends in .gz.

  The file appears atomically (written beside it, then renamed), so a reader
  or an interrupted run never sees a half-written file under the final name.
  Its mode is the usual one for new files (0o666 less the umask).

  Raises:
    ValueError: the array's dtype or shape cannot be stored as idx.
  """
  array = np.asarray(array)
  native = array.dtype.newbyteorder("=")
  if native not in _NATIVE_TO_CODE:
    raise ValueError(f"idx cannot store dtype {array.dtype} (supported: "
                     "uint8, int8, int16, int32, float32, float64)")
  if not 1 <= array.ndim <= 255:
    raise ValueError(f"idx stores 1 to 255 dimensions, got {array.ndim}")
  if any(d >= 1 << 32 for d in array.shape):
    raise ValueError(f"idx dimensions must be < 2^32, got {array.shape}")
  code = _NATIVE_TO_CODE[native]
  header = (bytes([0, 0, code, array.ndim]) +
            struct.pack(f">{array.ndim}I", *array.shape))
  data = np.ascontiguousarray(array, dtype=native.newbyteorder(">"))

  path = pathlib.Path(path)
  fd, tmp = files.create_temp(path.parent, f".{path.name}.", ".tmp")
  try:
    with os.fdopen(fd, "wb") as raw:
      if path.name.endswith(".gz"):
        # Fixed mtime and no name: the same array always gives the same bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                           compresslevel=compresslevel, mtime=0) as f:
          f.write(header)
          f.write(memoryview(data.reshape(-1).view(np.uint8)))
      else:
        raw.write(header)
        raw.write(memoryview(data.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
