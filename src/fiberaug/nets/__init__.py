"""Plain `nn.Module` networks, free of any training logic."""

from fiberaug.nets.context_unet import ContextUNet

__all__ = ["ContextUNet"]
