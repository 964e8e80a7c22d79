"""ResNet50 from random initialisation (no pretrained weights), 5 epochs.

    python train.py --config=configs/scratch.py --workdir=runs/scratch

99.55% and 99.51% on seeds 0 and 1, in 57 and 60.3 minutes of training on
a shared 2-core CPU (docs/results.md, which has the ablations behind each
value).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.init = "scratch"
  # Adam's per-parameter step sizes: from scratch this network is unstable
  # under SGD at useful learning rates (loss rises around the peak).
  c.optimizer = "adamw"
  # Batch 64 runs as many images/s as 128 on a CPU and makes twice the
  # updates (at 3 epochs, 128 beat 256 by 0.9 points).
  c.batch_size = 64
  # Per 256 examples, scaled linearly: the peak is 3e-3 at batch 64, the
  # square-root scaling of the 4e-3 that was stable at batch 128.
  c.learning_rate = 12e-3
  c.warmup_steps = 300
  c.num_epochs = 5.0
  # Takes the edge off a rare large gradient; Adam's normalised step is
  # otherwise unchanged by the scale.
  c.grad_clip_norm = 1.0
  # Decoupled, on kernels only (never BatchNorm parameters or biases).
  c.weight_decay = 0.05
  # Every parameter is new, so the backbone gets the full learning rate.
  c.backbone_lr_multiplier = 1.0
  # No dropout in the head (the layer stays, configs/default.py keeps the
  # notebook's 0.5): at 3 epochs it cost accuracy.
  c.dropout_rate = 0.0
  # Label smoothing and an EMA of the weights (evaluated instead of them):
  # together ahead after every epoch (after epoch 2, 99.36% against 98.68%)
  # and at the end (99.55% against 99.51%, one seed each); at the end the
  # EMA is 0.02 points of it, the cosine schedule having settled the weights.
  c.label_smoothing = 0.1
  c.ema_decay = 0.999
  # BatchNorm statistics must follow the weights closely (0.99 averages over
  # ~100 steps, 0.9 over ~10).
  c.bn_momentum = 0.9
  # Zero-initialised branches leave Keras's v1 shortcuts (stride on a 1x1
  # conv) carrying only MNIST's black corner at 32x32: a loss stuck at ln 10.
  c.zero_init_residual = False
  return c
