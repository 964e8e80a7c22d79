"""The model: a ResNet laid out like keras.applications.ResNet50, its inputs
(uint8 digits -> normalised images, augmentation, on the device), Keras
weight files and the converted format, and FLOP counts."""
