"""The workdir lock in Cloud Storage (gs://): a lease in lock.json.

lock.json holds the holder and an expiry; it is created only if absent and
replaced only if unchanged (generation preconditions: compare-and-swap), and
renewed every min(lease/3, 20 s) by a daemon thread. A run that finds a
lease of someone else watches it (its own clock) for three renewal periods,
at most MAX_SILENCE_S whatever lease the holder wrote: a renewal means the
holder is alive and the run is refused; none means it died, and the lease is
taken over. A holder whose renewal finds the object changed, or that could
not renew for that long, has lost the lock: `check()` raises.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from typing import Any
import uuid

from absl import logging

try:
  from google.api_core import exceptions as google_errors
  from google.auth import exceptions as auth_errors
except ImportError:  # Only gs:// workdirs need them; runlock.acquire says so.
  google_errors = auth_errors = None

from mnist_resnet.core.errors import one_line
from mnist_resnet.workdir.lock_holder import LOCK_NAME
from mnist_resnet.workdir.lock_holder import PROCEED
from mnist_resnet.workdir.lock_holder import Lock
from mnist_resnet.workdir.lock_holder import describe
from mnist_resnet.workdir.lock_holder import holder_info
from mnist_resnet.workdir.lock_holder import parse_holder
from mnist_resnet.workdir.lock_holder import stamp
from mnist_resnet.workdir.lock_holder import utc_now
from mnist_resnet.workdir.rundir import RunDirError

# --- Cloud Storage: a lease with generation preconditions ------------------

# Holders renew at least this often, so a lease unrenewed for three times as
# long belongs to a dead run, whatever lease_seconds its lock.json says.
RENEW_EVERY_MAX_S = 20.0
MAX_SILENCE_S = 3 * RENEW_EVERY_MAX_S
# How often a run watching another's lease says how long it still waits.
WATCH_LOG_EVERY_S = 10.0


class _Seen:
  """lock.json as read: its generation and holder (None if unreadable)."""

  def __init__(self, generation: int, holder: dict[str, Any] | None):
    self.generation = generation
    self.holder = holder


class Lease(Lock):
  """A renewed lease in gs://bucket/path/lock.json."""

  def __init__(self, workdir: str, lease: float):
    bucket, _, prefix = workdir[len("gs://"):].partition("/")
    if not bucket:
      raise RunDirError(f"workdir {workdir} names no bucket")
    self.path = f"{workdir}/{LOCK_NAME}"
    self._workdir = workdir
    self._bucket = bucket
    self._lease = lease
    # Silent this long, the lease is another run's to take: lost.
    self._period = silence_limit(lease)
    # Every request gives up after one renewal period: a renewal must land
    # before the next one is due, and an unreachable bucket fails in bounded
    # time.
    self._deadline = self._period / 3
    client, self._retry = _client(self.path, self._deadline)
    self._blob = client.bucket(bucket).blob(
        f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME)
    # Recognises our own writes: a write retried after its response was lost
    # fails its precondition although it landed.
    self._token = uuid.uuid4().hex
    self._started = stamp(utc_now())
    self._generation = None
    self._renewed_at = 0.0  # monotonic start of the last write that landed
    self._lost = None  # why the lease was lost
    self._last_error = None
    self._stop = threading.Event()
    self._thread = None
    self._released = False

  @classmethod
  def acquire(cls, workdir: str, lease: float) -> Lease:
    lock = cls(workdir, lease)
    lock._take()
    lock._thread = threading.Thread(
        target=lock._renew_forever, name="runlock-renewal", daemon=True)
    lock._thread.start()
    return lock

  # Acquisition.

  def _take(self) -> None:
    seen = None
    for _ in range(3):  # a race lost to another starter reads the object again
      seen = self._read()
      if seen is None:
        if self._write_if(0):
          return
        continue
      if not self._long_expired(seen):
        latest = self._watch(seen)
        if latest is None:
          continue  # released while we watched: free
        if latest.generation != seen.generation:
          raise self._refusal(latest)
      if self._write_if(seen.generation):
        logging.warning("took over the lock of %s from a run that stopped "
                        "renewing it (%s, expires %s)", self._workdir,
                        describe(seen.holder),
                        (seen.holder or {}).get("expires", "?"))
        return
    raise RunDirError(f"workdir {self._workdir}: other runs keep taking "
                      f"{self.path} ({describe(seen and seen.holder)}): "
                      f"{PROCEED}")

  def _refusal(self, seen: _Seen) -> RunDirError:
    return RunDirError(
        f"workdir {self._workdir} is in use by another run "
        f"({describe(seen.holder)}; it renews its lease in {self.path}): "
        f"{PROCEED}; a killed run frees it within "
        f"{silence_limit(_holder_lease(seen, self._lease)):.0f} s")

  def _long_expired(self, seen: _Seen) -> bool:
    """Expired more than a lease ago: dead even if clocks differ by a lease."""
    try:
      expires = datetime.datetime.fromisoformat(seen.holder["expires"])
      margin = datetime.timedelta(seconds=_holder_lease(seen, self._lease))
      return utc_now() > expires + margin
    except (TypeError, KeyError, ValueError):  # no, or a naive, expiry
      return False

  def _watch(self, seen: _Seen) -> _Seen | None:
    """lock.json after up to one lease period: changed as soon as it changes
    (renewed, or taken by another), None once released, else unchanged."""
    period = silence_limit(_holder_lease(seen, self._lease))
    logging.info("%s is held by %s; watching it for up to %.0f s", self.path,
                 describe(seen.holder), period)
    end = time.monotonic() + period
    next_note = time.monotonic() + WATCH_LOG_EVERY_S
    latest = seen
    while latest is not None and latest.generation == seen.generation and (
        left := end - time.monotonic()) > 0:
      if time.monotonic() >= next_note:
        logging.info("%s not renewed yet: taking it over in %.0f s unless "
                     "it is", self.path, left)
        next_note += WATCH_LOG_EVERY_S
      time.sleep(min(max(0.2, period / 30), left))
      latest = self._read()
    return latest

  def _write_if(self, generation: int) -> bool:
    """Writes our lease if lock.json is at `generation` (0: absent)."""
    try:
      self._upload(generation)
      return True
    except google_errors.PreconditionFailed:
      return self._landed_anyway()

  # Renewal.

  def _renew_forever(self) -> None:
    while not self._stop.wait(self._period / 3) and self._lost is None:
      self._renew()

  def _renew(self) -> None:
    try:
      self._upload(self._generation)
    except google_errors.PreconditionFailed:
      try:
        if self._landed_anyway():
          return
      except RunDirError:
        return  # cannot tell now; the next renewal asks again
      self._lost = self._lost_message()
      logging.error("%s", self._lost)
    except RunDirError as e:  # unreachable for now: check() says when too long
      self._last_error = str(e)
      logging.warning("could not renew the lock: %s", e)

  def _landed_anyway(self) -> bool:
    """After a failed precondition: does lock.json hold our lease anyway?"""
    seen = self._read()
    if seen is None or not self._ours(seen):
      return False
    self._generation = seen.generation
    return True

  def _lost_message(self) -> str:
    try:
      seen = self._read()
    except RunDirError:
      seen = None
    now = "it is gone" if seen is None else (
        f"now held by {describe(seen.holder)}")
    return (f"lost the lock of workdir {self._workdir} ({self.path} changed: "
            f"{now}); this run stops so that two runs never write it")

  def check(self) -> None:
    if self._lost is not None:
      raise RunDirError(self._lost)
    silent = time.monotonic() - self._renewed_at
    if silent > self._period:
      raise RunDirError(
          f"could not renew the lock {self.path} for {silent:.0f} s "
          f"({self._last_error}); another run may have taken over the "
          "workdir, so this one stops")

  # Release.

  def release(self) -> None:
    if self._released:
      return
    self._released = True
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=self._deadline + 5)
    if self._lost is not None:
      return
    try:
      seen = self._read()
      # Deleted only while ours. The precondition covers a takeover between
      # the read and the delete; the read is there because fake-gcs-server
      # ignores preconditions on delete (fsouza/fake-gcs-server#1282).
      if seen is not None and self._ours(seen):
        self._call("remove", self._blob.delete,
                   if_generation_match=seen.generation)
    except (google_errors.PreconditionFailed, google_errors.NotFound):
      pass  # no longer ours, or gone
    except RunDirError as e:
      logging.warning("could not remove the lock (%s); another run takes it "
                      "over within %.0f s", e, self._period)

  # Requests.

  def _ours(self, seen: _Seen) -> bool:
    return (seen.holder or {}).get("token") == self._token

  def _read(self) -> _Seen | None:
    """lock.json, None if there is none."""
    blob = self._blob.bucket.blob(self._blob.name)  # fresh: no stale fields
    try:
      data = self._call("read", blob.download_as_bytes)
    except google_errors.NotFound:
      return None  # no object, or no bucket: the create that follows says
    return _Seen(blob.generation, parse_holder(data))

  def _upload(self, generation: int) -> None:
    """Writes our lease if lock.json is at `generation`; notes the new one."""
    started = time.monotonic()
    expires = utc_now() + datetime.timedelta(seconds=self._period)
    holder = holder_info(self._started, expires, lease_seconds=self._period,
                          token=self._token)
    self._call("write", self._blob.upload_from_string,
               json.dumps(holder) + "\n", content_type="application/json",
               if_generation_match=generation)
    self._generation = self._blob.generation
    self._renewed_at = started

  def _call(self, what: str, method, *args, **kwargs):
    """One request, retried for at most one renewal period. NotFound and
    PreconditionFailed pass through; any other failure is one RunDirError."""
    from google.cloud.storage import exceptions as storage_errors  # pylint: disable=g-import-not-at-top
    try:
      return method(*args, timeout=self._deadline, retry=self._retry, **kwargs)
    except google_errors.PreconditionFailed:
      raise
    except google_errors.NotFound:
      if what == "write":  # a write creates the object: the bucket is missing
        raise RunDirError(f"cannot use workdir {self._workdir}: bucket "
                          f"gs://{self._bucket} does not exist") from None
      raise
    except (google_errors.GoogleAPIError, auth_errors.GoogleAuthError,
            storage_errors.InvalidResponse, storage_errors.DataCorruption,
            OSError) as e:
      raise RunDirError(f"cannot {what} {self.path}: "
                        f"{_describe_error(e)}") from None


def silence_limit(lease: float) -> float:
  """How long a lease of `lease` seconds may go unrenewed before another run
  takes it over: the lease, at most MAX_SILENCE_S."""
  return min(lease, MAX_SILENCE_S)


def _holder_lease(seen: _Seen, default: float) -> float:
  """The holder's own lease period (its environment may override another)."""
  value = (seen.holder or {}).get("lease_seconds")
  if isinstance(value, (int, float)) and 1 <= value <= 3600:
    return float(value)
  return default


def _describe_error(error: Exception) -> str:
  code = getattr(error, "code", None)
  if code in (401, 403):
    return f"no permission ({code})"
  return f"{type(error).__name__}: {one_line(error, limit=300)}"


def _client(path: str, deadline: float):
  """A Cloud Storage client (STORAGE_EMULATOR_HOST, or Google's default
  credentials) and a retry policy that gives up after `deadline` seconds."""
  # Imported here: local runs never need it.
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  try:
    client = storage.Client()
  except (auth_errors.GoogleAuthError, OSError) as e:
    raise RunDirError(f"cannot reach {path}: no Google Cloud credentials "
                      f"({_describe_error(e)})") from None
  return client, storage.retry.DEFAULT_RETRY.with_timeout(deadline)
