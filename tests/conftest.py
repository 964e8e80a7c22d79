"""Shared pytest fixtures.

Real MNIST is read from ../shared/data/mnist beside the checkout (or from
$MNIST_DIR). Tests that need it skip with a reason when it is absent, unless
$MNIST_REQUIRED=1 (as in CI), where a missing dataset fails them: a run that
skips the training, resume and benchmark tests must not pass.
"""

import fcntl
import itertools
import os
import pathlib
import shutil
import tempfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST_DIR = pathlib.Path(
    os.environ.get("MNIST_DIR", REPO_ROOT.parent / "shared" / "data" / "mnist"))
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# One XLA compilation cache per test session, given to the train.py runs
# that do not test the cache or signals during compilation, and to the
# tests' own compilations (a test that builds the program a run built, to
# restore its checkpoints or compare its initial state, loads it): the same
# small programs compile once. The first process (pytest, or pytest-xdist's
# controller) makes it; its workers find it in the environment.
_CACHE_ENV = "MNIST_RESNET_TEST_XLA_CACHE"
_MADE_CACHE = _CACHE_ENV not in os.environ
if _MADE_CACHE:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="mnist_resnet_xla_")
COMPILE_CACHE = pathlib.Path(os.environ[_CACHE_ENV])
CACHE_FLAG = f"--config.compilation_cache_dir={COMPILE_CACHE}"


def pytest_configure(config):  # pylint: disable=unused-argument
  # Before anything compiles: JAX decides once per process whether it uses a
  # cache.
  from mnist_resnet.training import compile_cache
  compile_cache.enable(str(COMPILE_CACHE))


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _MADE_CACHE:  # Not a worker's: the others may still be running.
    shutil.rmtree(COMPILE_CACHE, ignore_errors=True)


def _has_mnist(directory: pathlib.Path) -> bool:
  return all((directory / f).exists() or (directory / (f + ".gz")).exists()
             for f in MNIST_FILES)


# The slowest files, slowest first (the first three's summed `--durations`,
# 2 workers on 2 cores: 1205, 782 and 539 s; each of the others trains
# several runs of a minute or so). With `-n`, whole files go to whichever
# worker is free in collection order, so a heavy file collected last would
# run alone at the end; a stale list costs balance, never correctness.
SLOWEST_FILES = ("test_train.py", "test_preemption.py", "test_multihost.py",
                 "test_gcs.py", "test_benchmark.py", "test_run_record.py",
                 "test_goodput.py", "test_tfds.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
  """Directory holding the four real MNIST idx files, or skip."""
  if not _has_mnist(MNIST_DIR):
    why = (f"real MNIST not found in {MNIST_DIR} (set MNIST_DIR to a "
           "directory with the four idx files to run this test)")
    if os.environ.get("MNIST_REQUIRED") == "1":
      pytest.fail(why + "; MNIST_REQUIRED=1", pytrace=False)
    pytest.skip(why)
  return MNIST_DIR


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  """A real local Cloud Storage server (fake-gcs-server), one per session.

  The variables of `env()` point gcsfs, etils.epath and tensorstore at it; they
  are set in this process for the session too.
  """
  from tests import gcs_emulator  # pylint: disable=g-import-not-at-top
  try:
    server = gcs_emulator.GcsEmulator(
        tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log")
  except (ImportError, RuntimeError) as e:
    pytest.fail(f"could not start the local Cloud Storage server: {e}",
                pytrace=False)
  saved = {k: os.environ.get(k) for k in server.env()}
  os.environ.update(server.env())
  yield server
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.stop()


_BUCKETS = itertools.count()


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
  """A new empty bucket on the session's server: "gs://NAME"."""
  return gcs_server.create_bucket(f"test-bucket-{os.getpid()}-{next(_BUCKETS)}")


@pytest.fixture(scope="session")
def trained_workdir(mnist_dir, tmp_path_factory) -> pathlib.Path:
  """A tiny model's run, shared by the after-training tools' tests (they
  only read it).

  The smoke config for 60 steps (test accuracy about 0.76) with a held-out
  validation split, so the workdir has a best checkpoint as well as the
  latest (steps 20, 40, 60, each evaluated), and every file a run writes.
  Trained once per session: a pytest-xdist worker that needs it while
  another trains it waits on a file lock, then reads that one's.
  """
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent  # The session's, above each worker's own.
  workdir = shared / "trained" / "run"
  with open(shared / "trained.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "results.json").exists():  # Written last.
      shutil.rmtree(workdir, ignore_errors=True)  # A failed earlier try.
      workdir.parent.mkdir(exist_ok=True)
      _train_tiny_model(workdir, mnist_dir)
  return workdir


def _train_tiny_model(workdir: pathlib.Path, mnist_dir: pathlib.Path) -> None:
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, str(REPO_ROOT / "train.py"),
         f"--config={REPO_ROOT / 'configs' / 'smoke.py'}",
         f"--workdir={workdir}", f"--config.data_dir={mnist_dir}",
         CACHE_FLAG, "--config.num_train_steps=60",
         "--config.eval_every_steps=20",
         "--config.checkpoint_every_steps=20",
         "--config.validation_examples=5000", "--config.log_every_steps=10"]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  if proc.returncode != 0:
    pytest.fail(f"training the shared tiny model failed "
                f"({proc.returncode}):\n{proc.stderr[-3000:]}", pytrace=False)
