"""`python -m mnist_resnet.export`: see commands/export.py."""

from mnist_resnet.commands import export

if __name__ == "__main__":
  export.run()
