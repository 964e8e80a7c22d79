"""`python -m mnist_resnet.evaluate`: see commands/evaluate.py."""

from mnist_resnet.commands import evaluate

if __name__ == "__main__":
  evaluate.run()
