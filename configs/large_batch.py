"""ResNet50 from scratch at batch 1024 on an accelerator, to 99.5% as fast
as it goes: the time-to-accuracy recipe.

    python train.py --config=configs/large_batch.py --workdir=runs/fast

or, over seeds, with the median and range of the time to target:

    python -m mnist_resnet.benchmark \\
        --config=configs/benchmark.py:large_batch --config.mode=target

configs/scratch.py's recipe (AdamW, label smoothing, an EMA of the weights)
scaled to the batch an accelerator runs well, with the data on the devices
and bfloat16 compute. Not yet measured: its figures need an accelerator
(tools/accelerator_checks.sh runs it second, on seeds 0 and 1).
"""

from configs import scratch


def get_config():
  c = scratch.get_config()
  c.batch_size = 1024
  c.eval_batch_size = 2500
  c.input_pipeline = "device"
  c.dtype = "bfloat16"
  # 3e-3 per 256 examples is 1.2e-2 at batch 1024: scratch.py's peak of
  # 3e-3 at batch 64, square-root scaled by 16x the batch.
  c.learning_rate = 3e-3
  # 58 steps an epoch (55,000 training images): warm up over the first.
  c.warmup_steps = 58
  c.num_epochs = 6.0
  # An average over ~100 steps: 0.999 would still remember the first epoch
  # at the end of a 6-epoch run of 58-step epochs.
  c.ema_decay = 0.99
  # Time to accuracy, judged on 5,000 held-out training images (never the
  # test set), every half epoch; the run ends at the first evaluation that
  # reaches it.
  c.validation_examples = 5000
  c.eval_every_steps = 29
  c.target_accuracy = 0.995
  c.stop_at_target = True
  c.checkpoint_every_steps = 1000
  return c
