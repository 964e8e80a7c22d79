"""The workdir lock on a local disk: `fcntl.flock` on lock.json, held open
for the whole run. The kernel drops it when the process dies, however it
dies, so a restart after SIGKILL never waits. The holder's host, pid and
start time are written into the file once the lock is held, for the
message of a refused run."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from typing import Any

from absl import logging

from mnist_resnet.workdir.lock_holder import LOCK_NAME
from mnist_resnet.workdir.lock_holder import PROCEED
from mnist_resnet.workdir.lock_holder import Lock
from mnist_resnet.workdir.lock_holder import describe
from mnist_resnet.workdir.lock_holder import holder_info
from mnist_resnet.workdir.lock_holder import parse_holder
from mnist_resnet.workdir.lock_holder import stamp
from mnist_resnet.workdir.lock_holder import utc_now
from mnist_resnet.workdir.rundir import RunDirError

# --- Local directories: flock ---------------------------------------------

# On NFS, Linux emulates flock with NFS byte-range locks, which hold across
# clients when the server runs a lock manager (NFSv4, or v3 with lockd); a
# mount with `nolock`, and FUSE mounts such as gcsfuse, lock per host only, so
# two hosts could both run. A filesystem that refuses locks (ENOLCK,
# EOPNOTSUPP) runs unlocked with a warning rather than not at all.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class FileLock(Lock):
  """flock on workdir/lock.json, which stays open until release."""

  def __init__(self, path: str, fd: int):
    self.path = path
    self._fd = fd
    self._inode = _inode(os.fstat(fd))

  @classmethod
  def acquire(cls, directory: str) -> Lock:
    path = os.path.join(directory, LOCK_NAME)
    fd = _open_lock_file(directory, path)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_local_holder(fd)
      os.close(fd)
      raise RunDirError(
          f"workdir {directory} is in use by another run ({describe(holder)};"
          f" {path} is locked): {PROCEED}") from None
    except OSError as e:
      os.close(fd)
      if e.errno in _NO_LOCKS:
        logging.warning("%s cannot be locked (%s): nothing stops a second run "
                        "on this workdir", path, e.strerror)
        return Lock()
      raise RunDirError(f"cannot lock {path}: {e.strerror}") from None
    lock = cls(path, fd)
    lock._write(holder_info(stamp(utc_now()), expires=None))
    return lock

  def _write(self, holder: dict[str, Any]) -> None:
    # In place, never by rename: the lock belongs to this inode, and a new
    # file would be a second, free lock.
    data = json.dumps(holder).encode() + b"\n"
    try:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, data, 0)
      os.fsync(self._fd)
    except OSError as e:
      self.release()
      raise RunDirError(f"cannot write {self.path}: {e.strerror}") from None

  def check(self) -> None:
    # lock.json deleted or replaced (workdir wiped mid-run): a new run would
    # lock the new file, so this run no longer excludes anyone.
    try:
      same = _inode(os.stat(self.path)) == self._inode
    except OSError:
      same = False
    if not same:
      raise RunDirError(f"{self.path} was removed or replaced while this run "
                        "held it, so another run may use the workdir now")

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # an empty lock.json names nobody
    except OSError:
      pass
    os.close(fd)  # closing drops the flock
    # The file stays: unlinking it would let a run that opened it a moment ago
    # lock the orphaned inode while the next run locks a new file.


def _inode(stat: os.stat_result) -> tuple[int, int]:
  return stat.st_dev, stat.st_ino


def _open_lock_file(directory: str, path: str) -> int:
  try:
    os.makedirs(directory, exist_ok=True)
    # O_CLOEXEC: processes the run starts do not inherit the lock, so none of
    # them can keep it after the run is killed.
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
  except OSError as e:
    raise RunDirError(f"cannot use workdir {directory}: "
                      f"{e.filename or path}: {e.strerror or e}") from None


def _read_local_holder(fd: int, wait: float = 1.0) -> dict[str, Any] | None:
  """The holder written into the file; it may still be writing it."""
  deadline = time.monotonic() + wait
  while True:
    holder = parse_holder(os.pread(fd, 1 << 16, 0))
    if holder is not None or time.monotonic() > deadline:
      return holder
    time.sleep(0.05)
