"""Whether a compiled step fits in the devices' memory, asked of the
compiler (`memory_analysis`) before the step runs, and a batch that would.

XLA's own out-of-memory error comes only once the step runs, wrapped in
tracebacks; this check turns it into one line naming the batch, what the
step asks for and a smaller batch to try. Where the backend cannot say how
much memory is free, nothing is checked.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from mnist_resnet.core.errors import ConfigError

_MEMINFO = "/proc/meminfo"
# cgroup v2: a container's limit and use, when it is tighter than the host.
_CGROUP_LIMIT = "/sys/fs/cgroup/memory.max"
_CGROUP_USAGE = "/sys/fs/cgroup/memory.current"


class OutOfMemory(ConfigError):
  """A batch whose step needs more memory than the devices have free."""


def _read_int(path: str) -> int | None:
  try:
    with open(path, encoding="ascii") as f:
      return int(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    return None  # Absent, or "max": no limit.


def host_available_bytes() -> int | None:
  """Memory the host can still give this process: MemAvailable, or less
  where a cgroup limit is tighter; free pages where /proc is missing."""
  available = None
  try:
    with open(_MEMINFO, encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          available = int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  if available is None:
    try:
      available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
      return None
  limit, usage = _read_int(_CGROUP_LIMIT), _read_int(_CGROUP_USAGE)
  if limit is not None and usage is not None:
    available = min(available, max(0, limit - usage))
  return available


def available_bytes() -> int | None:
  """Bytes free to one of this process's devices: the allocator's limit
  less what is in use (GPU, TPU), or the host's free memory shared by its
  CPU devices; None where neither is known."""
  device = jax.local_devices()[0]
  stats = device.memory_stats()
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform != "cpu":
    return None
  host = host_available_bytes()
  return None if host is None else host // len(jax.local_devices())


def required_bytes(compiled: Any, resident: bool = False) -> tuple[int, int]:
  """(bytes one device needs to run `compiled`, of which fixed): arguments,
  outputs and temporaries, less donated arguments. `resident`: the
  arguments are in memory already (a state being evaluated), so only the
  outputs and temporaries are new. The fixed part does not grow with the
  batch: arguments and outputs (the state), all but the temporaries."""
  stats = compiled.memory_analysis()
  temp = int(stats.temp_size_in_bytes)
  fixed = int(stats.output_size_in_bytes)
  if not resident:
    fixed += (int(stats.argument_size_in_bytes)
              - int(stats.alias_size_in_bytes))
  return fixed + temp, fixed


def smaller_batch(per_device: int, need: int, fixed: int, free: int,
                  devices: int) -> int | None:
  """A global batch that should fit: memory grows about linearly with the
  batch above the fixed part; rounded down to a power of two per device.
  None when not even one example per device fits."""
  per_example = max(1.0, (need - fixed) / max(1, per_device))
  fits = int((free - fixed) // per_example)
  fits = min(fits, per_device - 1)
  if fits < 1:
    return None
  return (1 << (fits.bit_length() - 1)) * devices


def _size(n: int) -> str:
  return f"{n} bytes ({n / 2**30:.1f} GiB)"


def check_fits(compiled: Any, *, what: str, key: str, batch_size: int,
               resident: bool = False) -> None:
  """Raises OutOfMemory, naming config.`key`, when `compiled` (`what`, run
  on global batches of `batch_size`) needs more than a device has free."""
  free = available_bytes()
  if free is None:
    return
  need, fixed = required_bytes(compiled, resident)
  if need <= free:
    return
  devices = jax.device_count()
  per_device = -(-batch_size // devices)
  device = jax.local_devices()[0]
  said = (f"config.{key}={batch_size} ({per_device} per device) does not fit "
          f"in memory: {what} needs {_size(need)} per device, and a "
          f"{device.platform} device has {_size(free)} free")
  smaller = smaller_batch(per_device, need, fixed, free, devices)
  if smaller is None:
    raise OutOfMemory(f"{said}; not even one example per device fits "
                      "(its fixed part is " + _size(fixed) + ")")
  raise OutOfMemory(f"{said}; try config.{key}={smaller}")
