"""`python -m mnist_resnet.inspect_data`: see commands/inspect_data.py."""

from mnist_resnet.commands import inspect_data

if __name__ == "__main__":
  inspect_data.run()
