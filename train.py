"""Fine-tune ResNet50 on MNIST.

    python train.py --config=configs/default.py --workdir=runs/default \\
        [--config.KEY=VALUE ...]

All the work is in `mnist_resnet.train.train_and_evaluate`; this file parses
flags and turns the project's own errors into one line on stderr, exit code 2.
"""


from absl import app
from absl import flags
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
  from mnist_resnet import train  # pylint: disable=g-import-not-at-top
  config = cli.config_value(_CONFIG)
  with cli.user_errors():
    train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
