"""Training: the program (model + optimizer + jitted step), the loop,
evaluation and its report, checkpoints, metrics, stop signals, config
checks, the compilation cache, and a trained model read back for the
tools."""
