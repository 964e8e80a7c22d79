"""`python -m mnist_resnet.predict`: see commands/predict.py."""

from mnist_resnet.commands import predict

if __name__ == "__main__":
  predict.run()
