"""A run's directory, local or gs://: where each file lives, whole-file
writes, the saved config, and the one-run-per-workdir lock."""
