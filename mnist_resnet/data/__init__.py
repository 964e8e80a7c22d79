"""MNIST from files to batches: the idx format, the four files (found,
downloaded, checked), the training order as a pure function of
(seed, step), and the two input pipelines (tf.data on the host, or the
whole dataset on the devices) that follow it."""
