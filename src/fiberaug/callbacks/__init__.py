"""Lightning callbacks that FiberAug adds to the trainer."""

from fiberaug.callbacks.checkpoint import ModelCheckpoint
from fiberaug.callbacks.ema import EMA
from fiberaug.callbacks.metrics import SampleMetrics
from fiberaug.callbacks.progress import ProgressBar
from fiberaug.callbacks.reconstruction_grid import ReconstructionGrid
from fiberaug.callbacks.sample_grid import SampleGrid
from fiberaug.callbacks.validation import FinalValidation

__all__ = [
    "EMA", "FinalValidation", "ModelCheckpoint", "ProgressBar", "ReconstructionGrid", "SampleGrid", "SampleMetrics",
]
