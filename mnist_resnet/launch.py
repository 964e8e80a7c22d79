"""Starts N copies of a command as the processes of one multi-process run.

For trying multi-host code on one machine (CPU devices talking over gloo on
127.0.0.1) and for tests:

    python -m mnist_resnet.launch --num_processes=2 --devices_per_process=2 \\
        -- python train.py --config=configs/smoke.py --workdir=/tmp/mp \\
           --config.distributed=true

Each process gets JAX_COORDINATOR_ADDRESS (a free port on 127.0.0.1),
JAX_NUM_PROCESSES, JAX_PROCESS_ID and its CPU device count. The launcher
waits for all of them; when one fails the others get a minute to end on
their own (a preemption ends them all), then are killed, and after --timeout
seconds all are. Its exit code is the first non-zero one (124 on
timeout). Real clusters start processes with their own tools (gcloud ... ssh
--worker=all, srun, mpirun); train.py then needs no launcher.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags

_NUM = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 1,
                                "CPU devices in each process.")
_TIMEOUT = flags.DEFINE_float("timeout", 600.0,
                              "Seconds before every process is ended.")
_LOG_DIR = flags.DEFINE_string(
    "logs", "", "Write process i's output to LOGS/process_i.log "
    "instead of this terminal.")

EXIT_TIMEOUT = 124


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(command: list[str], *, num_processes: int, devices_per_process: int,
           timeout: float, log_dir: str = "", grace: float = 60.0) -> int:
  """Runs `command` num_processes times; returns the run's exit code."""
  address = f"127.0.0.1:{free_port()}"
  procs, logs = [], []
  for i in range(num_processes):
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
      os.makedirs(log_dir, exist_ok=True)
      out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
      logs.append(out)
    procs.append(subprocess.Popen(command, env=env, stdout=out,
                                  stderr=subprocess.STDOUT if out else None))
  deadline = time.monotonic() + timeout
  code = None
  try:
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
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
      code = next((p.returncode for p in procs if p.returncode), 0)
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    for p in procs:
      p.wait()
    for f in logs:
      f.close()
  return code


def main(argv: list[str]) -> None:
  command = argv[1:]
  if command and command[0] == "--":
    command = command[1:]
  if not command:
    print("error: no command given (put it after --)", file=sys.stderr)
    sys.exit(2)
  sys.exit(launch(command, num_processes=_NUM.value,
                  devices_per_process=_DEVICES.value, timeout=_TIMEOUT.value,
                  log_dir=_LOG_DIR.value))


if __name__ == "__main__":
  app.run(main)
