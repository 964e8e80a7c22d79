"""mnist_resnet: fine-tune a Keras-layout ResNet50 on MNIST with JAX and Flax."""

__version__ = "0.1.0"
