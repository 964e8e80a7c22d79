"""What the workdir lock is made of, locally and in a bucket: the `Lock`
interface, and the holder record lock.json holds (host, pid, start time,
and a lease's expiry), written and described the same way by both."""

from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Any

LOCK_NAME = "lock.json"
PROCEED = "wait for it to end or stop it, or pass another --workdir"


class Lock:
  """A held lock; this base class is the no-op lock of unlockable workdirs."""

  path = None

  def check(self) -> None:
    """Raises RunDirError if the lock was lost."""

  def release(self) -> None:
    """Gives the lock up; idempotent."""

  def __enter__(self) -> Lock:
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def utc_now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


def stamp(moment: datetime.datetime) -> str:
  return moment.isoformat(timespec="seconds")


def holder_info(started: str, expires: datetime.datetime | None,
                 **extra) -> dict[str, Any]:
  return dict(host=socket.gethostname(), pid=os.getpid(), started=started,
              expires=None if expires is None else stamp(expires), **extra)


def describe(holder: dict[str, Any] | None) -> str:
  if not holder:
    return "holder unknown: the lock file names nobody"
  text = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
          f"started {holder.get('started', '?')}")
  return " ".join(text.split())  # one line whatever the file holds


def parse_holder(data: bytes) -> dict[str, Any] | None:
  try:
    value = json.loads(data)
  except ValueError:  # also UnicodeDecodeError
    return None
  return value if isinstance(value, dict) else None
