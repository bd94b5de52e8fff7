"""Lightning callbacks that FiberAug adds to the trainer."""

from fiberaug.callbacks.checkpoint import ModelCheckpoint
from fiberaug.callbacks.ema import EMA
from fiberaug.callbacks.metrics import SampleMetrics
from fiberaug.callbacks.progress import ProgressBar
from fiberaug.callbacks.sample_grid import SampleGrid

__all__ = ["EMA", "ModelCheckpoint", "ProgressBar", "SampleGrid", "SampleMetrics"]
