"""`python -m mnist_resnet.benchmark`: see commands/benchmark.py."""

from mnist_resnet.commands import benchmark

if __name__ == "__main__":
  benchmark.run()
