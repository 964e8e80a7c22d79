"""Throughput benchmark:

    python -m mnist_resnet.benchmark --config=configs/benchmark.py

Training keys come from configs/default.py (model, image_size, dtype, ...);
the keys below choose what is measured. To measure another config's
training setup, name it after a colon: `--config=configs/benchmark.py:gpu`
starts from configs/gpu.py (bfloat16, batch 1024), `:tpu` from
configs/tpu.py; the benchmark keys are added on top.
"""

import importlib

import ml_collections


def get_config(base: str = "default") -> ml_collections.ConfigDict:
  c = importlib.import_module(f"configs.{base or 'default'}").get_config()
  c.init = "scratch"  # Weights do not change the speed; skip the download.
  if base in ("", "default"):
    c.batch_size = 128
  # input | step | train | all (the three, then loop_efficiency) | target
  # (train to target_accuracy once per seed below: time to accuracy).
  c.mode = "all"
  # The target mode's seeds, comma-separated.
  c.seeds = "0,1"
  # Images the input benchmark times after its warm-up.
  c.input_images = 200_000
  # Timed steps, after bench_warmup_steps untimed ones, for the step and
  # train modes. The defaults are the least that gives a stable median and
  # p10/p90; tests lower them to keep CI fast.
  c.bench_steps = 20
  c.bench_warmup_steps = 3
  # The train mode times the real loop at the training config's checkpoint
  # cadence (every 500 steps: amortised, a save costs little, so the 20
  # timed steps hold none). Metrics are fetched and logged every 10 steps,
  # so the timed steps include two of those host round trips. To see what
  # one checkpoint costs, add --config.checkpoint_every_steps=20: the timed
  # steps then hold one save (see step_ms_max).
  c.log_every_steps = 10
  # Sweeps: comma-separated lists, e.g. "64,128"; every combination is
  # measured. Empty means the single batch_size / image_size above.
  c.batch_sizes = ""
  c.image_sizes = ""
  # Input pipelines the input and train modes measure, each with its own
  # loop_efficiency: "tfdata,device", or one of them (device alone on an
  # image without TensorFlow). Empty: config.input_pipeline.
  c.input_pipelines = "tfdata,device"
  # Capture a jax.profiler trace of a few steps into this directory
  # (TensorBoard's profile plugin or Perfetto open it). Traced steps are
  # never timed.
  c.profile_dir = ""
  return c
