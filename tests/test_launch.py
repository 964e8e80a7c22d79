"""`python tools/launch.py` with small stand-in processes: exit codes,
flag errors, and signals passed on to every process."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO_ROOT
from tools import launch

LAUNCH = str(REPO_ROOT / "tools" / "launch.py")


def _launch(*args: str, wait: bool = True):
  cmd = [sys.executable, LAUNCH, *args]
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=120)
  return proc.returncode, out, err


def _python(code: str) -> list[str]:
  return ["--", sys.executable, "-c", textwrap.dedent(code)]


def test_exit_status_of_a_signal_is_128_plus_n():
  assert launch.exit_status(-9) == 137
  assert launch.exit_status(-15) == 143
  assert launch.exit_status(3) == 3 and launch.exit_status(0) == 0


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV])
def test_process_killed_by_a_signal(signum):
  code, _, err = _launch("--num_processes=2", *_python(f"""
      import os, signal
      if os.environ["JAX_PROCESS_ID"] == "1":
        os.kill(os.getpid(), {int(signum)})
  """))
  assert code == 128 + signum, err


def test_first_failure_is_the_exit_code(tmp_path):
  code, _, _ = _launch("--num_processes=2", *_python(f"""
      import os, pathlib, sys
      i = os.environ["JAX_PROCESS_ID"]
      pathlib.Path({str(tmp_path)!r}, "ran_" + i).touch()
      sys.exit(3)
  """))
  assert code == 3
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ran_0", "ran_1"]


@pytest.mark.parametrize("args, message", [
    (("--num_processes=0",), "error: --num_processes=0: must be >= 1"),
    (("--num_processes=-2",), "error: --num_processes=-2: must be >= 1"),
    (("--devices_per_process=0",), "error: --devices_per_process=0: must be "
     ">= 1"),
    (("--timeout=0",), "error: --timeout=0.0: must be > 0"),
    (("--env=pbs",), "error: flag --env=pbs: value should be one of "
     "<jax|slurm|ompi>"),
    (("--no_such_flag=1",), "error: Unknown command line flag "
     "'no_such_flag'"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, args, message):
  marker = tmp_path / "started"
  code, out, err = _launch(*args, *_python(
      f"open({str(marker)!r}, 'w').close()"))
  assert code == 2, err
  assert err.count("\n") == 1 and err.startswith(message), err
  assert not marker.exists() and out == ""


@pytest.mark.parametrize("program, why", [
    ("no_such_program_xyz", "not found on PATH"),
    ("./no/such/program", "no such file"),
    (str(REPO_ROOT / "README.md"), "not an executable file"),
])
def test_command_that_cannot_run_is_one_line_exit_2(program, why):
  code, _, err = _launch("--num_processes=2", "--", program, "--flag")
  assert code == 2
  assert err == f"error: cannot run {program}: {why}\n"


def test_no_command_is_one_line_exit_2():
  code, _, err = _launch("--num_processes=2")
  assert (code, err) == (2, "error: no command given (put it after --)\n")


# Each process writes its pid, then waits; a signal is recorded in
# got_<process id> and ends it with 75, as train.py's preemption does.
_WAITER = """
    import os, pathlib, signal, sys, time
    d = pathlib.Path({directory!r})
    i = os.environ["JAX_PROCESS_ID"]

    def on_signal(signum, frame):
      with open(d / f"got_{{i}}", "a") as f:
        f.write(f"{{signum}}\\n")
      time.sleep(0.5)  # A second copy of the signal would be recorded.
      sys.exit(75)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    (d / f"pid_{{i}}").write_text(str(os.getpid()))
    time.sleep(100)
"""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  stat = pathlib.Path(f"/proc/{pid}/stat")
  return not (stat.exists() and stat.read_text().split()[2] == "Z")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_reach_every_process_once(tmp_path, signum):
  proc = _launch("--num_processes=3", *_python(
      _WAITER.format(directory=str(tmp_path))), wait=False)
  deadline = time.monotonic() + 60
  while len(list(tmp_path.glob("pid_*"))) < 3:
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline
    time.sleep(0.05)
  pids = [int((tmp_path / f"pid_{i}").read_text()) for i in range(3)]
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 75, err
  for i in range(3):
    assert (tmp_path / f"got_{i}").read_text() == f"{int(signum)}\n"
  assert not any(_alive(pid) for pid in pids)


# Each process writes the environment it got, named by its pid.
_DUMP_ENV = """
    import json, os, pathlib
    pathlib.Path({directory!r}, f"env_{{os.getpid()}}.json").write_text(
        json.dumps(dict(os.environ)))
"""


def _detected(monkeypatch, env: dict) -> tuple:
  """What JAX's cluster detection makes of `env` for the four values
  jax.distributed.initialize leaves to it."""
  from jax._src import clusters
  for name in list(os.environ):
    monkeypatch.delenv(name)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, 300)


@pytest.mark.parametrize("kind", ["jax", "slurm", "ompi"])
def test_each_process_gets_one_launchers_start_up_variables(
    tmp_path, monkeypatch, kind):
  """SLURM and Open MPI: JAX's detection finds the same coordinator in
  every process, on a port free when they start, the process count, a
  distinct id and the local device of one task per device; no JAX_* start-up
  variable. Those inherited from the launcher's environment are dropped."""
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "elsewhere:1")
  monkeypatch.setenv("JAX_PROCESS_ID", "9")
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1.0;tcp://10.0.0.1:1")
  code, _, err = _launch("--num_processes=2", f"--env={kind}", *_python(
      _DUMP_ENV.format(directory=str(tmp_path))))
  assert code == 0, err
  envs = [json.loads(p.read_text()) for p in tmp_path.glob("env_*.json")]
  assert len(envs) == 2
  if kind == "jax":
    assert not any(k.startswith(("SLURM_", "OMPI_")) for e in envs for k in e)
    assert sorted(e["JAX_PROCESS_ID"] for e in envs) == ["0", "1"]
    assert envs[0]["JAX_COORDINATOR_ADDRESS"] == envs[1][
        "JAX_COORDINATOR_ADDRESS"] != "elsewhere:1"
    return
  for env in envs:
    assert not [k for k in env if k.startswith("JAX_") and k not in (
        "JAX_PLATFORMS",)], env
    assert not any(k.startswith("SLURM_" if kind == "ompi" else "OMPI_")
                   for k in env)
  detected = sorted((_detected(monkeypatch, e) for e in envs),
                    key=lambda d: d[2])
  host = "localhost" if kind == "slurm" else "127.0.0.1"
  address = detected[0][0]
  assert [d[1:] for d in detected] == [(2, 0, [0]), (2, 1, [1])]
  assert detected[1][0] == address and address.startswith(host + ":")
  port = int(address.rsplit(":", 1)[1])
  assert port in launch.DERIVED_PORTS
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", port))  # Nothing took it since.
  # The port JAX derives is the one the launcher found free.
  variables = {"slurm": launch.slurm_variables,
               "ompi": launch.ompi_variables}[kind]
  for port in (61440, 63001, 65535):
    assert _detected(monkeypatch, variables(1, 2, port)) == (
        f"{host}:{port}", 2, 1, [1])
