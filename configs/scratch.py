"""ResNet50 from random initialisation (no pretrained weights).

    python train.py --config=configs/scratch.py --workdir=runs/scratch
"""

from configs import default


def get_config():
  c = default.get_config()
  c.init = "scratch"
  # Every parameter is new, so the backbone gets the full learning rate.
  c.backbone_lr_multiplier = 1.0
  # Short runs: BatchNorm statistics must follow the weights closely.
  c.bn_momentum = 0.9
  # Blocks start as the identity: stable from the first step.
  c.zero_init_residual = True
  return c
