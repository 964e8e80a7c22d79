"""`python -m mnist_resnet.convert`: see commands/convert.py."""

from mnist_resnet.commands import convert

if __name__ == "__main__":
  convert.run()
