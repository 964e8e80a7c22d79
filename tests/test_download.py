"""Downloads from mirrors, against a local HTTP server serving fixture files.

The official md5 table is patched to the fixtures' checksums, so the same
code path that protects real downloads is exercised without the network.
"""

import functools
import hashlib
import http.server
import os
import pathlib
import socket
import stat
import threading

import numpy as np
import pytest

from mnist_resnet.core.errors import DataError
from mnist_resnet.data import idx
from mnist_resnet.data import mnist


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args


@pytest.fixture
def fixtures(tmp_path) -> pathlib.Path:
  """Small, valid MNIST-shaped .gz files in a served directory."""
  root = tmp_path / "served" / "mnist"
  root.mkdir(parents=True)
  rng = np.random.default_rng(0)
  arrays = {
      mnist.TRAIN_IMAGES: rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
      mnist.TRAIN_LABELS: (np.arange(30) % 10).astype(np.uint8),
      mnist.TEST_IMAGES: rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
      mnist.TEST_LABELS: np.arange(10, dtype=np.uint8),
  }
  for name, array in arrays.items():
    idx.write_idx(root / (name + ".gz"), array)
  return root


@pytest.fixture
def official_md5(fixtures, monkeypatch) -> dict[str, str]:
  """Makes the fixtures "official" for the duration of a test."""
  table = {name: hashlib.md5((fixtures / (name + ".gz")).read_bytes())
           .hexdigest() for name in mnist.FILES}
  for name, md5 in table.items():
    monkeypatch.setitem(mnist.GZ_MD5, name, md5)
    monkeypatch.delitem(mnist.RAW_MD5, name)
  return table


@pytest.fixture
def server(fixtures, monkeypatch):
  """Base URL of a local server whose /mnist/ holds the fixtures."""
  for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
              "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  handler = functools.partial(_QuietHandler, directory=str(fixtures.parent))
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}"
  httpd.shutdown()
  httpd.server_close()
  thread.join()


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _listing(directory: pathlib.Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir())


def test_good_download(tmp_path, fixtures, official_md5, server):
  target = tmp_path / "new" / "mnist"  # Created on demand.
  paths = mnist.locate_files(target, download=True,
                             mirrors=[server + "/mnist/"])
  assert _listing(target) == sorted(n + ".gz" for n in mnist.FILES)
  for name, path in paths.items():
    assert path == target / (name + ".gz")
    assert path.read_bytes() == (fixtures / path.name).read_bytes()
  assert {ok for _, ok in mnist.checksum_details(paths).values()} == {True}


def test_load_mnist_downloads_from_module_mirrors(tmp_path, official_md5,
                                                  server, monkeypatch):
  monkeypatch.setattr(mnist, "MIRRORS", (server + "/mnist",))  # No slash.
  splits = mnist.load_mnist(tmp_path / "d", download=True)
  assert splits["train"].images.shape == (30, 28, 28)
  assert splits["test"].labels.tolist() == list(range(10))


def test_only_missing_files_are_fetched(tmp_path, fixtures, official_md5,
                                        server):
  target = tmp_path / "partial"
  target.mkdir()
  local = idx.read_idx(fixtures / (mnist.TEST_LABELS + ".gz"))
  idx.write_idx(target / mnist.TEST_LABELS, local)  # Uncompressed, kept.
  paths = mnist.locate_files(target, download=True,
                             mirrors=[server + "/mnist/"])
  assert paths[mnist.TEST_LABELS] == target / mnist.TEST_LABELS
  assert not (target / (mnist.TEST_LABELS + ".gz")).exists()
  assert len(_listing(target)) == 4


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_downloads_get_the_mode_of_new_files(tmp_path, official_md5, server,
                                             umask):
  """0o666 less the umask, as any new file; not mkstemp's 0600."""
  previous = os.umask(umask)
  try:
    paths = mnist.locate_files(tmp_path / "d", download=True,
                               mirrors=[server + "/mnist/"])
  finally:
    os.umask(previous)
  for path in paths.values():
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_wrong_checksum_rejected_and_nothing_left(tmp_path, official_md5,
                                                  server, monkeypatch):
  monkeypatch.setitem(mnist.GZ_MD5, mnist.TRAIN_LABELS, "0" * 32)
  target = tmp_path / "bad"
  url = server + "/mnist/"
  with pytest.raises(DataError) as info:
    mnist.locate_files(target, download=True, mirrors=[url])
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(
      f"could not download {mnist.TRAIN_LABELS}.gz into {target}: ")
  assert f"{url}{mnist.TRAIN_LABELS}.gz: md5 " in message
  assert f"is not the official {'0' * 32}" in message
  # Files before it in FILES were fetched; the rejected one and its
  # temporary file are gone; nothing after it was attempted.
  assert _listing(target) == [mnist.TRAIN_IMAGES + ".gz"]


def test_unreachable_first_mirror_then_next(tmp_path, official_md5, server):
  dead = f"http://127.0.0.1:{_closed_port()}/mnist/"
  missing = server + "/nothing-here/"  # HTTP 404.
  target = tmp_path / "fallback"
  paths = mnist.locate_files(target, download=True,
                             mirrors=[dead, missing, server + "/mnist/"],
                             timeout=5)
  assert len(paths) == 4
  assert _listing(target) == sorted(n + ".gz" for n in mnist.FILES)


def test_all_mirrors_fail_names_each(tmp_path, official_md5, server):
  dead = f"http://127.0.0.1:{_closed_port()}/mnist/"
  missing = server + "/nothing-here/"
  target = tmp_path / "fail"
  with pytest.raises(DataError) as info:
    mnist.locate_files(target, download=True, mirrors=[dead, missing],
                       timeout=5)
  message = str(info.value)
  assert "\n" not in message
  assert f"{dead}{mnist.TRAIN_IMAGES}.gz: " in message
  assert "refused" in message.lower()
  assert f"{missing}{mnist.TRAIN_IMAGES}.gz: HTTP 404" in message
  assert _listing(target) == []


def test_unwritable_directory_is_a_data_error(tmp_path, official_md5, server,
                                              monkeypatch):
  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(mnist.files, "create_temp", refuse)
  with pytest.raises(DataError, match="cannot write a download there: "
                     "Permission denied"):
    mnist.locate_files(tmp_path, download=True, mirrors=[server + "/mnist/"])
