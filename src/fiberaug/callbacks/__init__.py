"""Lightning callbacks that FiberAug adds to the trainer."""

from fiberaug.callbacks.checkpoint import ModelCheckpoint
from fiberaug.callbacks.sample_grid import SampleGrid

__all__ = ["ModelCheckpoint", "SampleGrid"]
