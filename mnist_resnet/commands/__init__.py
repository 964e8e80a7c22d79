"""One module per `python -m mnist_resnet.X` command (flags and main),
beside the library code only that command uses."""
