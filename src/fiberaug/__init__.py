"""FiberAug: grow a small image data set with augmentation pipelines and generative models."""

__version__ = "0.1.0"
