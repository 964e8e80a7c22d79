"""mnist_resnet: fine-tune a Keras-layout ResNet50 on MNIST with JAX and Flax."""

import os

# etils.epath sends gs:// through tf.io.gfile when TensorFlow is importable;
# that ties run directories and datasets in buckets to TensorFlow (absent on
# accelerator images) and to endpoints only TensorFlow knows. gcsfs serves
# gs:// for everything else (and STORAGE_EMULATOR_HOST for a local server).
# Set here, before any module can use epath: epath caches its choice once
# TensorFlow Datasets (imported by data/tfds_data.py) has asked for it.
os.environ.setdefault("EPATH_USE_TF", "false")

__version__ = "0.1.0"
