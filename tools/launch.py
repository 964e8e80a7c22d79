"""Starts N copies of a command as the processes of one multi-process run.

For trying multi-host code on one machine (CPU devices talking over gloo on
127.0.0.1) and for tests:

    python tools/launch.py --num_processes=2 --devices_per_process=2 \\
        -- python train.py --config=configs/smoke.py --workdir=/tmp/mp \\
           --config.distributed=true

Each process gets JAX_COORDINATOR_ADDRESS (a free port on 127.0.0.1),
JAX_NUM_PROCESSES, JAX_PROCESS_ID and its CPU device count. With --env=slurm
or --env=ompi it gets instead the variables that srun (one node, N tasks) or
Open MPI 4's mpirun set, and no JAX_* start-up variable: train.py with
--config.distributed=true then starts through JAX's SLURM or Open MPI
cluster detection, as on a cluster (the job id in them is chosen so that
the coordinator port JAX derives from it is free). Whichever --env, the
SLURM_*, OMPI_*, PMIX_* and JAX_* start-up variables of the launcher's own
environment are not passed on. The launcher waits for all the processes;
when one fails the others get a minute to end on their own (a preemption
ends them all), then are killed, and after --timeout seconds all are. Its
exit code is the first non-zero one: 128+N for a process killed by signal
N, as a shell reports it; 124 on timeout. SIGTERM, SIGINT and SIGHUP sent
to the launcher go to every process (a preemption notice reaches them all),
and the launcher waits for them as usual. A bad flag or a command that
cannot be started is one `error: ...` line and exit code 2. Real clusters
start processes with their own tools (gcloud ... ssh --worker=all, srun,
mpirun); train.py then needs no launcher.
"""

from __future__ import annotations

import os
import random
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
_ENV = flags.DEFINE_enum(
    "env", "jax", ["jax", "slurm", "ompi"], "The start-up variables each "
    "process gets: JAX's own (JAX_COORDINATOR_ADDRESS, ...), or those of "
    "srun or Open MPI 4's mpirun, for JAX's cluster detection.")
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


# Under SLURM and Open MPI, JAX derives the coordinator's port from the job
# id, in [61440, 65535] (jax/_src/clusters/{slurm,ompi}_cluster.py).
DERIVED_PORTS = range(65535 - 2**12 + 1, 65536)
# Job ids are this plus the port's offset in DERIVED_PORTS: any multiple of
# 4096 gives the same port.
JOB_BASE = 4096 * 7
# Inherited variables that would steer JAX's start-up (or its cluster
# detection) away from the chosen launcher's.
STARTUP_PREFIXES = ("SLURM_", "SLURMD_", "OMPI_", "PMIX_")
STARTUP_NAMES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                 "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT",
                 "JAX_LOCAL_DEVICE_IDS")
# The node a one-node SLURM step runs on, as its node list names it.
NODE = "localhost"


def free_derived_port() -> int:
  """A free port among those JAX derives from a job id."""
  ports = list(DERIVED_PORTS)
  random.shuffle(ports)
  for port in ports[:200]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return port
  raise ConfigError(f"no free port in {DERIVED_PORTS.start}-"
                    f"{DERIVED_PORTS.stop - 1} for the coordinator")


def slurm_variables(index: int, count: int, port: int) -> dict[str, str]:
  """What srun sets for task `index` of a `count`-task step on one node;
  JAX reads the port from SLURM_JOB_ID % 4096."""
  job = JOB_BASE + port - DERIVED_PORTS.start
  n, node = str(count), NODE
  return {
      "SLURM_JOB_ID": str(job), "SLURM_JOBID": str(job),
      "SLURM_JOB_NAME": "launch", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
      "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
      "SLURM_STEP_NUM_NODES": "1", "SLURM_JOB_NODELIST": node,
      "SLURM_NODELIST": node, "SLURM_STEP_NODELIST": node,
      "SLURMD_NODENAME": node, "SLURM_TOPOLOGY_ADDR": node,
      "SLURM_NTASKS": n, "SLURM_NPROCS": n, "SLURM_STEP_NUM_TASKS": n,
      "SLURM_TASKS_PER_NODE": n, "SLURM_STEP_TASKS_PER_NODE": n,
      "SLURM_PROCID": str(index), "SLURM_LOCALID": str(index),
      "SLURM_NODEID": "0", "SLURM_GTIDS": ",".join(map(str, range(count))),
      "SLURM_CPUS_ON_NODE": str(os.cpu_count() or 1),
      "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
      "SLURM_SRUN_COMM_HOST": "127.0.0.1",
  }


def ompi_variables(index: int, count: int, port: int) -> dict[str, str]:
  """What Open MPI 4's mpirun sets for rank `index` of `count` on one host.
  JAX takes the coordinator's host from OMPI_MCA_orte_hnp_uri (mpirun's own
  address) and its port from the job id there, a multiple of 4096; the
  port in that URI is mpirun's own, which nothing here listens on."""
  job = (JOB_BASE + port - DERIVED_PORTS.start) * 4096
  n, i = str(count), str(index)
  return {
      "OMPI_MCA_orte_hnp_uri": f"{job}.0;tcp://127.0.0.1:{port - 4096}",
      "OMPI_MCA_orte_ess_num_procs": n,
      "OMPI_COMM_WORLD_SIZE": n, "OMPI_COMM_WORLD_RANK": i,
      "OMPI_COMM_WORLD_LOCAL_RANK": i, "OMPI_COMM_WORLD_LOCAL_SIZE": n,
      "OMPI_COMM_WORLD_NODE_RANK": i, "OMPI_UNIVERSE_SIZE": n,
      "OMPI_FIRST_RANKS": "0", "OMPI_APP_CTX_NUM_PROCS": n,
      "PMIX_RANK": i, "PMIX_NAMESPACE": str(job + 1),
  }


def process_env(kind: str, index: int, count: int, port: int,
                base: dict[str, str]) -> dict[str, str]:
  """`base` without inherited start-up variables, plus those of launcher
  `kind` (jax, slurm, ompi) for process `index` of `count`."""
  env = {k: v for k, v in base.items()
         if not k.startswith(STARTUP_PREFIXES) and k not in STARTUP_NAMES}
  if kind == "slurm":
    env.update(slurm_variables(index, count, port))
  elif kind == "ompi":
    env.update(ompi_variables(index, count, port))
  else:
    env.update({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": str(count),
                "JAX_PROCESS_ID": str(index)})
  return env


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
           num_processes: int, devices_per_process: int, log_dir: str,
           env_kind: str) -> None:
  port = free_port() if env_kind == "jax" else free_derived_port()
  for i in range(num_processes):
    if forwarder.received:
      return  # Stopped while starting: the rest are not needed.
    env = process_env(env_kind, i, num_processes, port, dict(os.environ))
    env.update({
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
           timeout: float, log_dir: str = "", grace: float = 60.0,
           env_kind: str = "jax") -> int:
  """Runs `command` num_processes times; returns the run's exit code."""
  check_arguments(command, num_processes=num_processes,
                  devices_per_process=devices_per_process, timeout=timeout)
  logs: list = []
  forwarder = _Forwarder()
  procs = forwarder.procs
  code = None
  try:
    _start(command, forwarder, logs, num_processes=num_processes,
           devices_per_process=devices_per_process, log_dir=log_dir,
           env_kind=env_kind)
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
                  log_dir=_LOG_DIR.value, env_kind=_ENV.value)
  sys.exit(code)


if __name__ == "__main__":
  cli.run(main)
