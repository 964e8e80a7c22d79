"""Fine-tune ResNet50 on MNIST.

    python train.py --config=configs/default.py --workdir=runs/default \\
        [--config.KEY=VALUE ...]

All the work is in `mnist_resnet.train.train_and_evaluate`; this file parses
flags, joins the other processes of a multi-host run, and maps outcomes to
exit codes: 0 done; 2 a user error (one line on stderr: bad flag, config
value or file, diverged loss); 75 preempted by SIGTERM after saving a
checkpoint (rerun the same command to continue).
"""

import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from mnist_resnet import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  # pylint: disable=g-import-not-at-top
  from mnist_resnet import parallel
  from mnist_resnet import train
  from mnist_resnet.errors import EXIT_PREEMPTED, Preempted
  config = cli.config_value(_CONFIG)
  with cli.user_errors():
    # Before anything touches a device: join the other processes, if any.
    parallel.initialize_distributed(
        enabled=config.distributed,
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes, process_id=config.process_id)
    cli.tag_logs_with_process()
    try:
      train.train_and_evaluate(config, _WORKDIR.value)
    except Preempted as e:
      logging.warning("%s", e)
      sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  cli.run(main)
