"""Starts N copies of a command as the processes of one multi-process run.

For trying multi-host code on one machine (CPU devices talking over gloo on
127.0.0.1) and for tests:

    python tools/launch.py --num_processes=2 --devices_per_process=2 \\
        -- python train.py --config=configs/smoke.py --workdir=/tmp/mp \\
           --config.distributed=true

Each process gets JAX_COORDINATOR_ADDRESS (a free port on 127.0.0.1),
JAX_NUM_PROCESSES, JAX_PROCESS_ID and its CPU device count. The launcher
waits for all of them; when one fails the others get a minute to end on
their own (a preemption ends them all), then are killed, and after --timeout
seconds all are. Its exit code is the first non-zero one: 128+N for a
process killed by signal N, as a shell reports it; 124 on timeout. SIGTERM,
SIGINT and SIGHUP sent to the launcher go to every process (a preemption
notice reaches them all), and the launcher waits for them as usual. A bad
flag or a command that cannot be started is one `error: ...` line and exit
code 2. Real clusters start processes with their own tools (gcloud ... ssh
--worker=all, srun, mpirun); train.py then needs no launcher.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from absl import flags

# Run as a script from anywhere: the package is beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from mnist_resnet.core import cli
from mnist_resnet.core.errors import ConfigError

_NUM = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 1,
                                "CPU devices in each process.")
_TIMEOUT = flags.DEFINE_float("timeout", 600.0,
                              "Seconds before every process is ended.")
_LOG_DIR = flags.DEFINE_string(
    "logs", "", "Write process i's output to LOGS/process_i.log "
    "instead of this terminal.")

EXIT_TIMEOUT = 124
# Signals the launcher passes on to every process instead of dying of them
# (the processes would be orphaned).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def exit_status(returncode: int) -> int:
  """A child's exit status as a shell reports it: 128+N when signal N killed
  it (Popen's returncode is then -N)."""
  return 128 - returncode if returncode < 0 else returncode


def check_arguments(command: list[str], *, num_processes: int,
                    devices_per_process: int, timeout: float) -> None:
  """Raises ConfigError for anything that would fail after starting."""
  if not command:
    raise ConfigError("no command given (put it after --)")
  if num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes}: must be >= 1")
  if devices_per_process < 1:
    raise ConfigError(
        f"--devices_per_process={devices_per_process}: must be >= 1")
  if not timeout > 0:
    raise ConfigError(f"--timeout={timeout}: must be > 0")
  program = command[0]
  if shutil.which(program) is None:
    if os.sep not in program:
      why = "not found on PATH"
    elif os.path.exists(program):
      why = "not an executable file"
    else:
      why = "no such file"
    raise ConfigError(f"cannot run {program}: {why}")


def _open_log(log_dir: str, i: int):
  try:
    os.makedirs(log_dir, exist_ok=True)
    return open(os.path.join(log_dir, f"process_{i}.log"), "w")
  except OSError as e:
    raise ConfigError(f"--logs={log_dir}: cannot write "
                      f"{e.filename or log_dir}: {e.strerror or e}") from None


class _Forwarder:
  """The started processes; while installed, FORWARDED_SIGNALS that reach
  the launcher go to each of them, once."""

  def __init__(self):
    self.procs: list[subprocess.Popen] = []
    self.received: list[int] = []
    self._passed: dict[int, int] = {}  # pid -> signals passed on so far
    self._previous = {s: signal.signal(s, self._forward)
                      for s in FORWARDED_SIGNALS}

  def _forward(self, signum, frame) -> None:
    del frame
    self.received.append(signum)
    for p in self.procs:
      self._pass_on(p)

  def _pass_on(self, p: subprocess.Popen) -> None:
    for signum in self.received[self._passed.get(p.pid, 0):]:
      if p.poll() is None:
        p.send_signal(signum)
    self._passed[p.pid] = len(self.received)

  def add(self, p: subprocess.Popen) -> None:
    self.procs.append(p)
    self._pass_on(p)  # A signal that came while it was starting.

  def restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _start(command: list[str], forwarder: _Forwarder, logs: list, *,
           num_processes: int, devices_per_process: int, log_dir: str) -> None:
  address = f"127.0.0.1:{free_port()}"
  for i in range(num_processes):
    if forwarder.received:
      return  # Stopped while starting: the rest are not needed.
    env = dict(os.environ)
    env.update({
        "JAX_COORDINATOR_ADDRESS": address,
        "JAX_NUM_PROCESSES": str(num_processes),
        "JAX_PROCESS_ID": str(i),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                      f"device_count={devices_per_process}").strip(),
    })
    out = None
    if log_dir:
      out = _open_log(log_dir, i)
      logs.append(out)
    try:
      # Its own process group: a Ctrl-C at the terminal reaches the
      # launcher, which passes it on once, not every process twice.
      forwarder.add(subprocess.Popen(
          command, env=env, stdout=out,
          stderr=subprocess.STDOUT if out else None, process_group=0))
    except OSError as e:
      raise ConfigError(f"cannot run {command[0]}: "
                        f"{e.strerror or e}") from None


def launch(command: list[str], *, num_processes: int, devices_per_process: int,
           timeout: float, log_dir: str = "", grace: float = 60.0) -> int:
  """Runs `command` num_processes times; returns the run's exit code."""
  check_arguments(command, num_processes=num_processes,
                  devices_per_process=devices_per_process, timeout=timeout)
  logs: list = []
  forwarder = _Forwarder()
  procs = forwarder.procs
  code = None
  try:
    _start(command, forwarder, logs, num_processes=num_processes,
           devices_per_process=devices_per_process, log_dir=log_dir)
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      failed = [exit_status(p.returncode) for p in procs
                if p.returncode not in (None, 0)]
      if failed and code is None:
        # The others may be finishing the same way (a preemption save) or
        # be stuck waiting for the one that died: give them a grace period.
        code = failed[0]
        deadline = min(deadline, time.monotonic() + grace)
      if time.monotonic() > deadline:
        code = code if code is not None else EXIT_TIMEOUT
        break
      time.sleep(0.05)
    if code is None:
      code = next((exit_status(p.returncode) for p in procs if p.returncode),
                  0)
    if not procs and forwarder.received:  # Stopped before any started.
      code = 128 + forwarder.received[0]
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    for p in procs:
      p.wait()
    forwarder.restore()
    for f in logs:
      f.close()
  return code


def main(argv: list[str]) -> None:
  command = argv[1:]
  if command and command[0] == "--":
    command = command[1:]
  with cli.user_errors():
    code = launch(command, num_processes=_NUM.value,
                  devices_per_process=_DEVICES.value, timeout=_TIMEOUT.value,
                  log_dir=_LOG_DIR.value)
  sys.exit(code)


if __name__ == "__main__":
  cli.run(main)
