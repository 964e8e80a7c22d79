"""Throughput benchmark: python -m mnist_resnet.benchmark --config=configs/benchmark.py

Training keys come from configs/default.py (model, image_size, dtype, ...);
the keys below choose what is measured.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.init = "scratch"  # Weights do not change the speed; skip the download.
  c.batch_size = 128
  # input | step | train | all (the three, then loop_efficiency).
  c.mode = "all"
  # Images the input benchmark times after its warm-up.
  c.input_images = 200_000
  # Timed steps (after warmup_steps untimed ones) for step and train modes.
  c.bench_steps = 20
  c.bench_warmup_steps = 3
  # Sweeps: comma-separated lists; empty means the single value above.
  c.batch_sizes = ""
  c.image_sizes = ""
  # Capture a jax.profiler trace of a few steps into this directory.
  c.profile_dir = ""
  return c
