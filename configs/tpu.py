"""Overrides for Cloud TPU: bfloat16 compute and a large global batch.

    python train.py --config=configs/tpu.py --workdir=gs://BUCKET/runs/tpu

The global batch is split over every chip of every host; keep it divisible
by the chip count. Imports the main job; edit BASE to change that.
"""

from configs import default as BASE


def get_config():
  c = BASE.get_config()
  c.dtype = "bfloat16"
  c.batch_size = 2048
  c.eval_batch_size = 2048
  c.warmup_steps = 30
  return c
