"""Plain `nn.Module` networks, free of any training logic."""

from fiberaug.nets.context_unet import ContextUNet
from fiberaug.nets.dcgan import Discriminator, Generator
from fiberaug.nets.patchgan import PatchDiscriminator

__all__ = ["ContextUNet", "Discriminator", "Generator", "PatchDiscriminator"]
