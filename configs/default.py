"""The main job: fine-tune Keras's ImageNet ResNet50 on MNIST.

    python train.py --config=configs/default.py --workdir=runs/default

Recipe: SGD + Nesterov at 0.1 per 256 examples for the new head and 0.1x
that for the pretrained backbone, 100 warmup steps, cosine to zero over 3
epochs, BatchNorm statistics that follow MNIST quickly (bn_momentum below).
Its accuracy from Keras's ImageNet weights is not measured: they need network
access. The path itself (Keras weight file or `mnist_resnet.convert` output
-> backbone -> training -> results.json) is tested with a randomly
initialised Keras ResNet50.

Every other config imports this one and overrides what it needs, so this file
is the single list of keys. The config is locked: a key that is not defined
here is an error before anything runs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- Data --------------------------------------------------------------
  # mnist: the four MNIST idx files in data_dir. tfds:NAME[/CONFIG][:VERSION]:
  # a TensorFlow Datasets dataset of 28x28x1 uint8 images with 10 classes
  # (tfds:mnist, tfds:fashion_mnist, tfds:kmnist, ...), prepared in data_dir
  # used as TFDS's data_dir (local or gs://); needs tensorflow-datasets.
  c.dataset = "mnist"
  # Directory with the four MNIST idx files (train-images-idx3-ubyte.gz and
  # friends, gzip-compressed or not), or TFDS's data_dir for a tfds: dataset.
  c.data_dir = "data/mnist"
  # Fetch missing files from the public MNIST mirrors (checked against the
  # official md5), or let TFDS prepare a missing dataset. False: missing data
  # is an error.
  c.download = True
  # tfdata: tf.data on the host feeds each step. device: the whole dataset
  # (47 MB) sits on every device and the step gathers its own batch; no
  # TensorFlow needed. Both give the same batches, so the same run.
  c.input_pipeline = "tfdata"

  # --- Model -------------------------------------------------------------
  # resnet50 | resnet101 | resnet152 | resnet_tiny (same code, 1 block per
  # stage, narrow: for tests and smoke runs).
  c.model = "resnet50"
  # Where the backbone starts when the workdir holds no checkpoint:
  # imagenet (Keras's ImageNet weights) | scratch (random init).
  c.init = "imagenet"
  # With init=imagenet: a Keras weight file (.h5 / .weights.h5) or a directory
  # written by `python -m mnist_resnet.convert`. Empty: Keras's own download
  # and cache (~/.keras/models).
  c.pretrained_weights = ""
  # Input normalisation the weights expect: caffe (Keras: BGR, 0-255, ImageNet
  # mean subtracted) | torch (RGB, 0-1, ImageNet mean/std).
  c.input_convention = "caffe"
  # Side of the square model input. 28 is the raw digit; 32 pads 2 pixels each
  # side; larger sizes resize on the device.
  c.image_size = 32
  # Hidden dense layers between the pooled features and the 10-way output
  # (each followed by ReLU and dropout), e.g. (256,). Empty: one dense layer.
  c.hidden_units = ()
  # Dropout before each dense layer of the head (0.5 as in the notebook).
  c.dropout_rate = 0.5
  # BatchNorm momentum (Keras convention: running = m * running + (1 - m) *
  # batch). 0.9, not Keras's 0.99: evaluation must soon use MNIST's
  # statistics instead of ImageNet's (docs/results.md).
  c.bn_momentum = 0.9
  # Initialise the last BatchNorm scale of every residual branch to zero, so
  # each block starts as the identity. Only affects random init.
  c.zero_init_residual = False
  # Compute dtype: float32 | bfloat16. Parameters, BatchNorm statistics and
  # optimizer state stay float32.
  c.dtype = "float32"

  # --- Optimisation ------------------------------------------------------
  # Global batch size, split evenly over every device of every process.
  c.batch_size = 256
  # Length of training: num_train_steps when > 0, else num_epochs epochs
  # (an epoch is 60000 // batch_size steps).
  c.num_epochs = 3.0
  c.num_train_steps = -1
  # sgd (with momentum, optionally Nesterov) | adamw.
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.nesterov = True
  # Peak learning rate for a global batch of 256; scaled linearly with
  # batch_size (lr = learning_rate * batch_size / 256).
  c.learning_rate = 0.1
  # Linear warmup from 0 to the peak, then cosine decay to 0 at the end.
  c.warmup_steps = 100
  # Weight decay on convolution and dense kernels only (BatchNorm parameters
  # and biases are not decayed). sgd: L2, weight_decay * w added to the
  # gradient before momentum (as torch.optim.SGD does); adamw: decoupled,
  # applied beside the Adam step and scaled by the learning rate.
  c.weight_decay = 5e-5
  # Label smoothing of the cross-entropy targets (0 disables).
  c.label_smoothing = 0.1
  # Clip gradients to this global norm (0 disables).
  c.grad_clip_norm = 0.0
  # Which parameters train: all | head (backbone frozen: no gradients, no
  # optimizer state, BatchNorm in inference mode; the original notebook).
  c.trainable = "all"
  # Learning-rate multiplier for the backbone when trainable=all: pretrained
  # features need smaller steps than the freshly initialised head.
  c.backbone_lr_multiplier = 0.1
  # Exponential moving average of the parameters and BatchNorm statistics,
  # used for evaluation when > 0 (e.g. 0.999; the decay warms up as
  # min(decay, (1 + step) / (10 + step))). 0 disables.
  c.ema_decay = 0.0

  # --- Augmentation (on the device, keyed by step) ----------------------
  # Random translation of up to this many pixels in each direction.
  c.aug_max_shift = 2
  # Random rotation of up to +-this many degrees (0 disables).
  c.aug_max_rotation = 0.0
  # Random isotropic scaling by up to +-this fraction (0 disables).
  c.aug_max_scale = 0.0

  # --- Run ---------------------------------------------------------------
  # Seed of everything random: init, data order, augmentation, dropout.
  c.seed = 0
  # Log train metrics every N steps (TensorBoard, metrics.jsonl, console).
  c.log_every_steps = 50
  # Evaluate on the 10,000 test images every N steps; -1: at the end of every
  # epoch; 0: only at the end. The last step is always evaluated.
  c.eval_every_steps = -1
  # Test-set batch size (global); the last batch is padded and masked.
  c.eval_batch_size = 1000
  # Save a checkpoint every N steps (and always at the end).
  c.checkpoint_every_steps = 500
  # Hold the last N training examples out as a validation split: every
  # evaluation is then saved, and the best checkpoint by validation accuracy
  # is kept and reported (results.json: best_step, best_test_accuracy).
  # 0 (default): train on all 60,000, as every published MNIST figure does;
  # no best checkpoint (choosing one on the test set would be tuning on it).
  c.validation_examples = 0
  # Time to accuracy, MLPerf's metric: the first evaluation at or above this
  # accuracy ends the clock (results.json: target_reached_step,
  # seconds_to_target). Judged on the validation split when one is held out,
  # else on the test set. 0: off.
  c.target_accuracy = 0.0
  # End the run at that evaluation, with its checkpoint and report.
  c.stop_at_target = False
  # Keep this many most recent checkpoints (plus the best, see above).
  c.max_checkpoints_to_keep = 3
  # Capture a jax.profiler trace of this many steps, from the 10th step after
  # the run (re)starts, into workdir/profile (TensorBoard or Perfetto);
  # 0 disables.
  c.profile_steps = 0
  # Persistent XLA compilation cache: a restarted run (after preemption, or a
  # rerun of the same config) loads its compiled programs instead of
  # compiling them again. "{workdir}" stands for the run's workdir: the
  # default follows the run wherever it goes (a bucket, every host of a
  # multi-host run). Any directory or gs:// location works, e.g.
  # "~/.cache/mnist_resnet/xla" to share one cache between runs on a machine;
  # "" leaves JAX's setting ($JAX_COMPILATION_CACHE_DIR, else no cache). A
  # location that cannot be written is a warning, never an error.
  c.compilation_cache_dir = "{workdir}/compilation_cache"
  # GPUs only: deterministic XLA ops and no kernel autotuning, so a run and
  # its resume repeat bit for bit (CPU and TPU always do; docs/training.md,
  # Determinism). Costs step time and compile time.
  c.deterministic = False
  # Run 1x1 convolutions, and those whose kernel is larger than the map, as
  # matrix products (conv_as_dot in model/resnet.py): auto (on the backends
  # where that was measured faster, docs/benchmarking.md) | always | never.
  # Same parameters and sums, so a resume may change it.
  c.conv_as_dot = "auto"

  # --- Many hosts ----------------------------------------------------------
  # Join a multi-process run with jax.distributed.initialize (always done on
  # Cloud TPU, where JAX finds every value itself).
  c.distributed = False
  # host:port of process 0; empty: $JAX_COORDINATOR_ADDRESS or auto-detect.
  c.coordinator_address = ""
  # Number of processes and this process's index; -1: $JAX_NUM_PROCESSES /
  # $JAX_PROCESS_ID or auto-detect.
  c.num_processes = -1
  c.process_id = -1
  # JAX's cluster detection to use when the values above are unset: empty
  # tries each (Cloud TPU, SLURM, Open MPI 4, Kubernetes); mpi4py (opt-in in
  # JAX) serves Open MPI 5 and other MPIs, which JAX cannot detect otherwise.
  c.cluster_detection = ""
  # This process's accelerators, e.g. "0,1,2,3"; empty: JAX's choice (under
  # SLURM or Open MPI: the one GPU of the local task index, for one task per
  # GPU; with one task per host, list every GPU of the host here).
  c.local_device_ids = ""

  return c
