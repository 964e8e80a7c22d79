"""Fine-tune ResNet50 on MNIST.

    python train.py --config=configs/default.py --workdir=runs/default \\
        [--config.KEY=VALUE ...]

All the work is in `mnist_resnet.training.train.train_and_evaluate`; this
file owns the signals, parses flags, joins the other processes of a
multi-host run, and maps outcomes to exit codes:

  0    done (or already done: a finished workdir's results are left as they are)
  2    a user error, one line on stderr: bad flag, config value or file, a
       workdir in use or holding another run, a diverged loss
  75   stopped by SIGTERM (preemption) after saving a checkpoint, or before
       the first step: rerun the same command to continue; during the
       end-of-run report, once results.json is written
  130  stopped by Ctrl-C, the same way; a second Ctrl-C exits at once
"""

import sys

# First, before anything slow (imports, data, compiling): from here on a
# SIGTERM or Ctrl-C ends the run with its exit code, never a traceback.
from mnist_resnet.training import preemption

SIGNALS = preemption.StopSignals()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

from mnist_resnet.core import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and results.json go: a "
    "directory or a bucket location (gs://BUCKET/PATH).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  from mnist_resnet.core import parallel
  from mnist_resnet.core.errors import Preempted
  from mnist_resnet.core.errors import exit_code_of_signal
  from mnist_resnet.training import compile_cache
  from mnist_resnet.training import train
  config = cli.config_value(_CONFIG)
  try:
    with cli.user_errors():
      # Before anything touches a device: the start-up keys checked, XLA's
      # flags, then join the other processes, if any.
      parallel.parse_start_up_keys(config.cluster_detection,
                                   config.local_device_ids)
      parallel.request_deterministic_ops(config.deterministic)
      parallel.initialize_distributed(
          enabled=config.distributed,
          coordinator_address=config.coordinator_address,
          num_processes=config.num_processes, process_id=config.process_id,
          cluster_detection=config.cluster_detection,
          local_device_ids=config.local_device_ids)
      cli.tag_logs_with_process()
      # A restarted run (preemption!) loads its programs instead of compiling.
      compile_cache.enable(config.compilation_cache_dir, _WORKDIR.value)
      train.train_and_evaluate(config, _WORKDIR.value, signals=SIGNALS)
  except Preempted as e:
    logging.warning("%s", e)
    sys.exit(exit_code_of_signal(e.signum))


if __name__ == "__main__":
  cli.run(main)
