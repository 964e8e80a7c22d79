"""What every stage shares: the project's errors and exit codes, entry-point
plumbing (one-line errors), local files, the device mesh and shardings, and
TensorFlow kept off the accelerators. Imports nothing else of the project."""
