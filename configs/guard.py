"""The accuracy guard CI runs: the tiny ResNet at 40x40 for 1.5 epochs.

    python train.py --config=configs/guard.py --workdir=/tmp/guard

Measured on a shared 2-core CPU: 98.57% and 98.69% on the official test set
(seeds 0 and 1) in 72 s and 59 s of training (docs/results.md). The smoke config
stays the mechanics tests' model; this one exists to catch a change that
costs accuracy, which the smoke run's ~97.5% is too far from the tiny
model's ceiling to show.
"""

from configs import smoke


def get_config():
  c = smoke.get_config()
  # The Keras stem divides the input by 4 before the first block: a larger
  # input leaves the digit more pixels there (32x32: 97.2-97.7%; 40x40:
  # 98.3-98.4% after one epoch).
  c.image_size = 40
  c.num_epochs = 1.5
  # Fitting, not regularising, is what one and a half epochs need.
  c.dropout_rate = 0.0
  c.label_smoothing = 0.0
  return c
