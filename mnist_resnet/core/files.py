"""Files: new files with the usual permissions, places a run can write
to (a local directory, a bucket name Cloud Storage accepts), and what a
failed write means to a user.

Orbax writes checkpoints through tensorstore, which reports a full disk not
as an OSError but as a ValueError whose message ends in
`[os_error_code='28']`; `write_failure` understands both, and a bucket that
cannot be reached any more.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
from typing import Optional

from mnist_resnet.core.errors import ConfigError
from mnist_resnet.core.errors import WriteError
from mnist_resnet.core.errors import one_line

# What a user fixes by freeing space, choosing another directory or changing
# permissions: never a bug, so one line, not a traceback.
WRITE_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
    errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})
# Tensorstore's error text, parsed for the errno and the file: without them a
# full disk is a traceback, or a line without the file, see
# tests/test_cli.py::test_convert_on_a_full_disk_is_one_line_and_exits
# (checked with orbax-checkpoint 0.12.8, tensorstore 0.1.86).
_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='?(\d+)'?\]")
_QUOTED = re.compile(r'"([^"]+)"')
# A store that went away (a bucket's server, the network): what gcsfs's
# transport (aiohttp) raises once its retries are spent. Also a user's to
# fix, and it ends a run the same way.
UNREACHABLE_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED,
    errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
    errno.EHOSTDOWN, errno.ENETDOWN})
# Cloud Storage's bucket names: docs/operations.md#workdir-in-a-bucket.
_BUCKET_CHARACTERS = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")
_DOTTED_DECIMAL = re.compile(r"\d{1,3}(\.\d{1,3}){3}")


def is_remote(path: str | os.PathLike) -> bool:
  """True for locations with a scheme (gs://, s3://, ...): served through
  etils.epath, not the local file system."""
  return "://" in os.fspath(path)


def create_temp(directory: str | os.PathLike, prefix: str, suffix: str
                ) -> tuple[int, str]:
  """`tempfile.mkstemp`, but with the mode any new file gets (0o666 less the
  umask) instead of 0600: the file is renamed into place as a data file that
  other users and jobs may need to read. Returns (fd, path)."""
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
  for _ in range(100):
    path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
    try:
      return os.open(path, flags, 0o666), path
    except FileExistsError:
      continue
  raise FileExistsError(errno.EEXIST, "no free temporary file name",
                        str(directory))


def _causes(error: BaseException):
  """`error`, what it was raised from or during, and exceptions it carries
  as arguments (orbax's background threads re-raise that way)."""
  pending, seen = [error], set()
  while pending:
    e = pending.pop(0)
    if id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    pending.extend(c for c in (e.__cause__, e.__context__, *e.args)
                   if isinstance(c, BaseException))


def _tensorstore_failure(error: BaseException) -> Optional[WriteError]:
  text = " ".join(str(error).split())
  code = _TENSORSTORE_ERRNO.search(text)
  if code is None or int(code.group(1)) not in WRITE_ERRNOS:
    return None
  # The last quoted path is the file the write failed on; the ones before
  # it name the database or array around it.
  paths = [p for p in _QUOTED.findall(text[:code.start()]) if os.sep in p]
  return _write_error(paths[-1] if paths else None,
                      os.strerror(int(code.group(1))))


def _write_error(filename: Optional[str], reason: str) -> WriteError:
  where = f" {filename}" if filename else ""
  return WriteError(f"cannot write{where}: {reason}")


def write_failure(error: BaseException) -> Optional[WriteError]:
  """The one-line WriteError that `error` stands for when it, or any
  exception in its chain, is a failed write a user can fix (disk full, out
  of inodes, quota, read-only file system, permissions, a path through a
  file, a name too long, a store that cannot be reached); None
  otherwise."""
  for e in _causes(error):
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
      filename = e.filename if e.filename is not None else e.filename2
      return _write_error(
          os.fsdecode(filename) if filename is not None else None,
          e.strerror or os.strerror(e.errno))
    if isinstance(e, OSError) and e.errno in UNREACHABLE_ERRNOS:
      where = f" {os.fsdecode(e.filename)}" if e.filename else " the storage"
      return WriteError(f"cannot reach{where}: {one_line(e, limit=300)}")
    failure = _tensorstore_failure(e)
    if failure is not None:
      return failure
  return None


class _RaisedAnyway(logging.Filter):
  """Drops gcsfs's log of a request that failed for good: it logs it with a
  traceback, then raises the same error to its caller, which reports it."""

  # By message text: gcsfs/retry.py's retry_request (gcsfs 2026.10.1).
  _TEXTS = ("out of retries on exception", "non-retriable exception")

  def filter(self, record: logging.LogRecord) -> bool:
    return not any(t in str(record.msg) for t in self._TEXTS)


def quiet_storage_retries() -> None:
  """One line for a bucket that went away, not a traceback per request."""
  logger = logging.getLogger("gcsfs")
  if not any(isinstance(f, _RaisedAnyway) for f in logger.filters):
    logger.addFilter(_RaisedAnyway())


def _bucket_problem(bucket: str) -> Optional[str]:
  """Why Cloud Storage would refuse `bucket` as a bucket name, or None."""
  limit = 222 if "." in bucket else 63
  if not 3 <= len(bucket) <= limit:
    return (f"a name has 3 to 63 characters (222 with dots), not "
            f"{len(bucket)}")
  if not _BUCKET_CHARACTERS.fullmatch(bucket):
    return ("a name has only lowercase letters, digits, '-', '_' and '.', "
            "and starts and ends with a letter or digit")
  if any(len(part) > 63 for part in bucket.split(".")):
    return "each part between dots has at most 63 characters"
  if bucket.startswith("goog") or "google" in bucket:
    return "a name may not start with 'goog' or contain 'google'"
  if _DOTTED_DECIMAL.fullmatch(bucket):
    return "a name may not be an IP address"
  return None


def check_bucket_name(location: str, label: str) -> None:
  """Unless the bucket of a gs:// `location` has a name Cloud Storage
  accepts, raises ConfigError: `label` (the flag and its value), then why.
  Found here, not by a traceback from the first checkpoint's save."""
  if not location.startswith("gs://"):
    return
  bucket = location[len("gs://"):].partition("/")[0]
  if not bucket:
    raise ConfigError(f"{label}: names no bucket (gs://BUCKET/PATH)")
  problem = _bucket_problem(bucket)
  if problem is not None:
    raise ConfigError(f"{label}: {bucket!r} is not a Cloud Storage bucket "
                      f"name: {problem}")


def _name_max(directory: str) -> int:
  try:
    return os.pathconf(directory, "PC_NAME_MAX")
  except (OSError, ValueError):
    return 255


def check_writable_dir(path: str, label: str) -> None:
  """Unless `path` is a directory this process can write in or create,
  raises ConfigError: `label` (the flag and its value), then why. Creates
  nothing: the checks are the first existing ancestor's type and
  permissions, and the length of the names still to be created."""
  target = os.path.abspath(path)
  current, missing = target, []
  while not os.path.lexists(current):
    parent = os.path.dirname(current)
    if parent == current:
      break
    missing.append(os.path.basename(current))
    current = parent

  def fail(reason: str):
    raise ConfigError(f"{label}: {reason}")

  if os.path.islink(current) and not os.path.exists(current):
    fail(f"{current} is a broken symbolic link")
  if not os.path.isdir(current):
    fail(f"{current} is a file, not a directory" if os.path.isfile(current)
         else f"{current} is not a directory")
  if not os.access(current, os.W_OK | os.X_OK):
    read_only = os.statvfs(current).f_flag & getattr(os, "ST_RDONLY", 1)
    reason = os.strerror(errno.EROFS if read_only else errno.EACCES)
    fail(f"cannot write in {current}: {reason}")
  limit = _name_max(current)
  for name in missing:
    if len(os.fsencode(name)) > limit:
      fail(f"the name {name[:32]}... is longer than {limit} bytes")
