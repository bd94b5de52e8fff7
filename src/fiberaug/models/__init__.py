"""LightningModules. Each model lives in its own module so that importing one never imports another's libraries."""

from fiberaug.models.base import GenerativeModule
from fiberaug.models.loading import load_generator, read_checkpoint

__all__ = ["GenerativeModule", "load_generator", "read_checkpoint"]
