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
  # No zero-initialised residual branches: in Keras's v1 layout the stride
  # sits on 1x1 convolutions, so while every branch is zero the shortcuts
  # alone carry one corner pixel per stride-2 stage. At 32x32 that corner is
  # MNIST's black border: identical for every image, and BatchNorm (batch
  # statistics) turns it into all-zero features and a loss stuck at ln(10).
  c.zero_init_residual = False
  return c
