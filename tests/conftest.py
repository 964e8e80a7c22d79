"""Shared pytest fixtures.

Real MNIST is read from ../shared/data/mnist beside the checkout (or from
$MNIST_DIR). Tests that need it skip with a reason when it is absent, unless
$MNIST_REQUIRED=1 (as in CI), where a missing dataset fails them: a run that
skips the training, resume and benchmark tests must not pass.
"""

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


# One XLA compilation cache per test process (each pytest-xdist worker is
# one), given to the train.py runs that do not test the cache or signals
# during compilation: the same small programs compile once per worker.
COMPILE_CACHE = pathlib.Path(tempfile.mkdtemp(prefix="mnist_resnet_xla_"))
CACHE_FLAG = f"--config.compilation_cache_dir={COMPILE_CACHE}"


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
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
  """A tiny model's run, shared by the after-training tools' tests.

  The smoke config for 60 steps (test accuracy about 0.76) with a held-out
  validation split, so the workdir has a best checkpoint as well as the
  latest (steps 20, 40, 60, each evaluated), and every file a run writes.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("trained") / "run"
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
  return workdir
