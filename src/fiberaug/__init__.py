"""FiberAug: grow a small image data set with augmentation pipelines and generative models."""

import os

# albumentations 2 asks PyPI for a newer version whenever it is imported, unless this is set: an unasked-for
# network call (and a 2 s stall with an error line on an offline node). Set here, before any module of ours
# imports albumentations; DataLoader and augment.py workers inherit it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
