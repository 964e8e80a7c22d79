"""One live run per workdir: flock on local directories, a lease on gs://."""

from __future__ import annotations

import datetime
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO_ROOT
from mnist_resnet.workdir import lease
from mnist_resnet.workdir import runlock
from mnist_resnet.workdir.rundir import RunDirError

LEASE = 3.0  # seconds; the default (60) would make every test wait a minute
HOST = socket.gethostname()

# A run that holds the lock until killed, checking it like the training loop;
# it exits 3 with the reason once it has lost the lock.
HOLDER = """
import sys, time
from mnist_resnet.workdir import runlock
from mnist_resnet.workdir.rundir import RunDirError
lock = runlock.acquire(sys.argv[1], lease_seconds=float(sys.argv[2]))
print("held", flush=True)
while True:
  try:
    lock.check()
  except RunDirError as e:
    print("lost:", e, flush=True)
    sys.exit(3)
  time.sleep(0.1)
"""


@pytest.fixture
def holder():
  """Starts processes that hold a workdir's lock; kills them at the end."""
  started = []

  def start(workdir) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir), str(LEASE)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    started.append(proc)
    assert read_line(proc, timeout=30) == "held"
    return proc

  yield start
  for proc in started:
    if proc.poll() is None:
      proc.kill()
    proc.wait()


def read_line(proc: subprocess.Popen, timeout: float) -> str:
  ready, _, _ = select.select([proc.stdout], [], [], timeout)
  assert ready, f"no output from the holder within {timeout} s"
  return proc.stdout.readline().strip()


def refusal(workdir, **kwargs) -> tuple[str, float]:
  """The one-line error of a refused acquire, and how long it took."""
  start = time.monotonic()
  with pytest.raises(RunDirError) as e:
    runlock.acquire(workdir, **kwargs)
  message = str(e.value)
  assert "\n" not in message
  return message, time.monotonic() - start


def timed_acquire(workdir, **kwargs):
  start = time.monotonic()
  lock = runlock.acquire(workdir, **kwargs)
  return lock, time.monotonic() - start


# --- Local directories ------------------------------------------------------


def test_local_second_run_refused_naming_holder(tmp_path, holder):
  workdir = tmp_path / "run"
  proc = holder(workdir)
  message, _ = refusal(workdir)
  assert f"host {HOST}, pid {proc.pid}, started " in message
  assert f"workdir {workdir} is in use" in message and "--workdir" in message
  info = json.loads((workdir / "lock.json").read_text())
  assert info["host"] == HOST and info["pid"] == proc.pid
  assert info["expires"] is None  # the kernel holds it while the process lives
  started = datetime.datetime.fromisoformat(info["started"])
  assert abs((datetime.datetime.now(datetime.timezone.utc)
              - started).total_seconds()) < 60


def test_local_lock_of_a_killed_run_is_free_at_once(tmp_path, holder):
  workdir = tmp_path / "run"
  proc = holder(workdir)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  lock, seconds = timed_acquire(workdir)
  assert seconds < 1.0
  assert json.loads((workdir / "lock.json").read_text())["pid"] == os.getpid()
  lock.release()


def test_local_release_then_reacquire(tmp_path):
  workdir = tmp_path / "a" / "run"  # created
  lock = runlock.acquire(workdir)
  lock.check()
  # Another open file of the same process conflicts too: flock is per open
  # file, not per process.
  assert f"pid {os.getpid()}" in refusal(workdir)[0]
  lock.release()
  lock.release()  # idempotent
  assert (workdir / "lock.json").read_text() == ""  # names nobody
  with runlock.acquire(workdir) as again:
    assert json.loads((workdir / "lock.json").read_text())["pid"] == os.getpid()
    again.check()
  runlock.acquire(workdir).release()


def test_local_lock_file_removed_mid_run_is_a_lost_lock(tmp_path):
  lock = runlock.acquire(tmp_path)
  os.remove(lock.path)
  with pytest.raises(RunDirError, match="removed or replaced"):
    lock.check()
  lock.release()


def test_local_unusable_workdir_is_one_line(tmp_path):
  (tmp_path / "file").write_text("x")
  message, _ = refusal(tmp_path / "file" / "run")
  assert message.startswith(f"cannot use workdir {tmp_path / 'file' / 'run'}")


# --- Cloud Storage ----------------------------------------------------------


def test_gcs_workdir_without_the_client_libraries_is_one_line(monkeypatch):
  """Local runs need no Google Cloud libraries (accelerator images often
  lack them); a gs:// workdir says which package it needs."""
  monkeypatch.setattr(lease, "google_errors", None)
  with pytest.raises(RunDirError, match=r"^gs://bucket/run: a gs:// workdir "
                     r"needs google-cloud-storage"):
    runlock.acquire("gs://bucket/run")


def lock_object(gcs_server, workdir: str) -> dict | None:
  """lock.json of a gs:// workdir as the server has it, None if absent."""
  bucket, _, prefix = workdir[len("gs://"):].partition("/")
  name = f"{prefix}/lock.json"
  if name not in gcs_server.list_objects(bucket, name):
    return None
  return json.loads(blob(workdir).download_as_bytes())


def blob(workdir: str):
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  bucket, _, prefix = workdir[len("gs://"):].partition("/")
  return storage.Client().bucket(bucket).blob(f"{prefix}/lock.json")


def write_foreign(workdir: str, expires_in: float, pid: int = 4242,
                  lease_seconds: float = LEASE) -> None:
  """Another run's lease, written as that run would (or left behind)."""
  expires = (datetime.datetime.now(datetime.timezone.utc)
             + datetime.timedelta(seconds=expires_in))
  blob(workdir).upload_from_string(json.dumps(dict(
      host="other-host", pid=pid, started="2024-01-01T00:00:00+00:00",
      expires=expires.isoformat(), lease_seconds=lease_seconds,
      token="theirs")))


def test_gcs_second_run_refused_while_holder_renews(gcs_server, gcs_bucket):
  workdir = f"{gcs_bucket}/run"
  lock = runlock.acquire(workdir, lease_seconds=LEASE)
  info = lock_object(gcs_server, workdir)
  assert info["host"] == HOST and info["pid"] == os.getpid()
  assert info["lease_seconds"] == LEASE
  expires = datetime.datetime.fromisoformat(info["expires"])
  assert expires > datetime.datetime.now(datetime.timezone.utc)

  message, seconds = refusal(workdir, lease_seconds=LEASE)
  # Refused on seeing a renewal, before the lease could run out.
  assert seconds < LEASE
  assert (f"workdir {workdir} is in use by another run (host {HOST}, "
          f"pid {os.getpid()}, started {info['started']}") in message
  assert "--workdir" in message and f"within {LEASE:.0f} s" in message
  lock.check()  # the refused run took nothing
  lock.release()
  assert lock_object(gcs_server, workdir) is None


def test_gcs_lease_of_a_killed_run_is_taken_over_within_a_lease(
    gcs_bucket, holder, caplog):
  workdir = f"{gcs_bucket}/run"
  proc = holder(workdir)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  lock, seconds = timed_acquire(workdir, lease_seconds=LEASE)
  # It watched a whole lease for a renewal (a live holder keeps its lock),
  # then took over without waiting much longer.
  assert LEASE - 0.1 <= seconds < LEASE + 2
  assert f"pid {proc.pid}" in caplog.text and "took over" in caplog.text
  lock.check()
  lock.release()


def test_gcs_lease_expired_long_ago_is_taken_at_once(gcs_server, gcs_bucket):
  workdir = f"{gcs_bucket}/run"
  write_foreign(workdir, expires_in=-3600)  # the VM went away an hour ago
  lock, seconds = timed_acquire(workdir, lease_seconds=LEASE)
  assert seconds < LEASE / 2
  assert lock_object(gcs_server, workdir)["pid"] == os.getpid()
  lock.release()


def test_gcs_dead_holder_of_a_long_lease_is_taken_over_in_bounded_time(
    gcs_server, gcs_bucket, monkeypatch, caplog):
  """lock.json of a dead holder that wrote a lease of an hour, expiring in
  the future: holders renew at least every RENEW_EVERY_MAX_S, so it is taken
  over after MAX_SILENCE_S (scaled down here) without a renewal, and the
  wait says how long it still has to go."""
  assert (lease.RENEW_EVERY_MAX_S, lease.MAX_SILENCE_S) == (20, 60)
  monkeypatch.setattr(lease, "MAX_SILENCE_S", LEASE)
  monkeypatch.setattr(lease, "WATCH_LOG_EVERY_S", LEASE / 4)
  workdir = f"{gcs_bucket}/run"
  write_foreign(workdir, expires_in=3600, lease_seconds=3600)
  caplog.set_level(logging.INFO)
  taken = []
  # A thread: without the bound it would wait an hour.
  worker = threading.Thread(daemon=True, target=lambda: taken.append(
      timed_acquire(workdir, lease_seconds=LEASE)))
  worker.start()
  worker.join(timeout=LEASE + 10)
  assert taken, "still waiting for the dead holder's hour-long lease"
  lock, seconds = taken[0]
  assert LEASE - 0.1 <= seconds < LEASE + 2
  notes = [r.getMessage() for r in caplog.records
           if "taking it over in" in r.getMessage()]
  assert len(notes) >= 2, caplog.text
  assert lock_object(gcs_server, workdir)["pid"] == os.getpid()
  lock.release()


def test_gcs_holder_renews_within_the_bound_whatever_its_lease(
    gcs_server, gcs_bucket):
  """A lease longer than MAX_SILENCE_S is held as MAX_SILENCE_S: that is
  what lock.json says, and what others wait for."""
  workdir = f"{gcs_bucket}/run"
  with lease.Lease.acquire(workdir, 3600):
    info = lock_object(gcs_server, workdir)
  assert info["lease_seconds"] == lease.MAX_SILENCE_S
  expires = datetime.datetime.fromisoformat(info["expires"])
  left = expires - datetime.datetime.now(datetime.timezone.utc)
  assert 0 < left.total_seconds() <= lease.MAX_SILENCE_S


def test_gcs_racing_starters_one_wins(gcs_bucket, monkeypatch):
  """Create and takeover are compare-and-swap: a run that read an old state
  (no lock, or a dead holder's) and writes after another starter loses."""
  workdir = f"{gcs_bucket}/run"
  first = runlock.acquire(workdir, lease_seconds=LEASE)
  stale_views = [None]  # "lock.json absent", as read before `first` wrote
  real_read = lease.Lease._read  # pylint: disable=protected-access

  def read(self):
    return stale_views.pop() if stale_views else real_read(self)

  monkeypatch.setattr(lease.Lease, "_read", read)  # pylint: disable=protected-access
  assert f"pid {os.getpid()}" in refusal(workdir, lease_seconds=LEASE)[0]
  first.check()
  first.release()

  write_foreign(workdir, expires_in=-3600)
  dead = real_read(first)  # the dead holder's lease, as both starters see it
  second = runlock.acquire(workdir, lease_seconds=LEASE)  # took it at once
  stale_views.append(dead)
  refusal(workdir, lease_seconds=LEASE)
  second.check()
  second.release()


def test_gcs_takeover_makes_the_old_holder_check_raise(gcs_bucket):
  workdir = f"{gcs_bucket}/run"
  lock = runlock.acquire(workdir, lease_seconds=LEASE)
  write_foreign(workdir, expires_in=LEASE)  # someone took it over
  deadline = time.monotonic() + LEASE
  while time.monotonic() < deadline:  # noticed at the next renewal
    try:
      lock.check()
    except RunDirError as e:
      assert "lost the lock" in str(e)
      assert "host other-host, pid 4242" in str(e)
      break
    time.sleep(0.1)
  else:
    pytest.fail("check() did not notice the takeover")
  lock.release()
  assert json.loads(blob(workdir).download_as_bytes())["pid"] == 4242


def test_gcs_frozen_holder_loses_its_lock(gcs_bucket, holder):
  """A holder paused past its lease (SIGSTOP: a frozen VM, a long pause) is
  taken over, and stops by itself once it runs again."""
  workdir = f"{gcs_bucket}/run"
  proc = holder(workdir)
  proc.send_signal(signal.SIGSTOP)
  try:
    lock, seconds = timed_acquire(workdir, lease_seconds=LEASE)
  finally:
    proc.send_signal(signal.SIGCONT)
  assert seconds < LEASE + 2
  assert read_line(proc, timeout=LEASE).startswith("lost: ")
  assert proc.wait(timeout=LEASE) == 3
  lock.check()
  lock.release()


def test_gcs_release_deletes_only_its_own_lease(gcs_server, gcs_bucket):
  workdir = f"{gcs_bucket}/run"
  # A long lease: the next renewal (which would notice the takeover) is 10 s
  # away, so release() itself must see that the lease is no longer ours.
  lock = runlock.acquire(workdir, lease_seconds=30)
  write_foreign(workdir, expires_in=30)
  lock.release()
  assert lock_object(gcs_server, workdir)["pid"] == 4242
  blob(workdir).delete()
  with runlock.acquire(workdir, lease_seconds=30):
    assert lock_object(gcs_server, workdir)["pid"] == os.getpid()
  assert lock_object(gcs_server, workdir) is None


def test_gcs_missing_bucket_is_one_line(gcs_server):
  message, seconds = refusal("gs://no-such-bucket-here/run",
                             lease_seconds=LEASE)
  assert message == ("cannot use workdir gs://no-such-bucket-here/run: "
                     "bucket gs://no-such-bucket-here does not exist")
  assert seconds < 5


def test_gcs_unreachable_server_is_one_line_in_bounded_time(
    gcs_server, monkeypatch):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
  message, seconds = refusal("gs://bucket/run", lease_seconds=LEASE)
  assert message.startswith("cannot read gs://bucket/run/lock.json: ")
  assert seconds < 2 * LEASE


def test_lease_period_from_environment(gcs_server, gcs_bucket, monkeypatch):
  monkeypatch.delenv(runlock.LEASE_ENV, raising=False)
  assert runlock.lease_from_env() == runlock.LEASE_SECONDS == 60
  for bad in ("abc", "0.5", "nan", "61", "3600"):
    monkeypatch.setenv(runlock.LEASE_ENV, bad)
    with pytest.raises(RunDirError, match=runlock.LEASE_ENV):
      runlock.lease_from_env()
  monkeypatch.setenv(runlock.LEASE_ENV, "3")
  with runlock.acquire(f"{gcs_bucket}/run"):
    assert lock_object(gcs_server, f"{gcs_bucket}/run")["lease_seconds"] == 3
