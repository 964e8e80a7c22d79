"""The original notebook's set-up: frozen ImageNet backbone, trained head.

ResNet50(include_top=False, weights="imagenet", pooling="avg"), frozen, with
BatchNorm in inference mode; dropout 0.5 and a dense layer on top. Kept for
comparison with the full fine-tune of configs/default.py.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.trainable = "head"
  c.optimizer = "adamw"
  c.learning_rate = 1e-3
  c.weight_decay = 0.0
  c.label_smoothing = 0.0
  c.warmup_steps = 0
  return c
