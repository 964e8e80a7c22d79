"""One live run per workdir: `workdir/lock.json`.

    lock = runlock.acquire(workdir)   # RunDirError naming the holder if taken
    lock.check()                      # at checkpoints: RunDirError if lost
    lock.release()                    # idempotent; `with acquire(w):` too

Only process 0 of a multi-host run takes it: an `fcntl.flock` locally
(`flock.py`), a lease in a bucket (`lease.py`).
docs/operations.md#one-run-per-workdir.
"""

from __future__ import annotations

import math
import os

from absl import logging

from mnist_resnet.core import files
from mnist_resnet.workdir import flock
from mnist_resnet.workdir import lease
from mnist_resnet.workdir import rundir
from mnist_resnet.workdir.lock_holder import Lock
from mnist_resnet.workdir.rundir import RunDirError

# Seconds a Cloud Storage lease lasts without renewal: the longest a restart
# after a killed run waits. MNIST_RESNET_LOCK_LEASE_SECONDS overrides it
# (1 to lease.MAX_SILENCE_S).
LEASE_SECONDS = 60.0
LEASE_ENV = "MNIST_RESNET_LOCK_LEASE_SECONDS"


def acquire(workdir: str | os.PathLike, *,
            lease_seconds: float | None = None) -> Lock:
  """Takes the workdir's lock or raises RunDirError naming the holder."""
  text = os.fspath(workdir)
  if not files.is_remote(text):
    return flock.FileLock.acquire(os.fspath(rundir.workdir_path(text)))
  if text.startswith("gs://"):
    if lease.google_errors is None:
      raise RunDirError(f"{text}: a gs:// workdir needs google-cloud-storage "
                        "(pip install -r requirements.txt)")
    seconds = lease_seconds if lease_seconds is not None else lease_from_env()
    return lease.Lease.acquire(text.rstrip("/"), _checked_lease(seconds))
  logging.warning("no run lock for %s (only local and gs:// workdirs have "
                  "one): nothing stops a second run on it", text)
  return Lock()


def lease_from_env() -> float:
  value = os.environ.get(LEASE_ENV)
  if not value:
    return LEASE_SECONDS
  try:
    return _checked_lease(float(value))
  except ValueError:
    raise RunDirError(f"{LEASE_ENV}={value!r} is not a number of "
                      "seconds") from None


def _checked_lease(seconds: float) -> float:
  # Longer would not help: holders renew at least every 20 s, so another
  # run takes over a lease unrenewed for 60 s whatever it says.
  if not (math.isfinite(seconds) and 1 <= seconds <= lease.MAX_SILENCE_S):
    raise RunDirError(f"the lock lease must be 1 to {lease.MAX_SILENCE_S:.0f}"
                      f" s, not {seconds} ({LEASE_ENV})")
  return float(seconds)
