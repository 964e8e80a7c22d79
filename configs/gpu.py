"""Overrides for NVIDIA GPUs: bfloat16 compute and a larger global batch.

    python train.py --config=configs/gpu.py --workdir=runs/gpu

Imports the main job; edit BASE to put the overrides on another config.
"""

from configs import default as BASE


def get_config():
  c = BASE.get_config()
  c.dtype = "bfloat16"
  c.batch_size = 1024
  c.eval_batch_size = 2000
  c.warmup_steps = 50
  return c
