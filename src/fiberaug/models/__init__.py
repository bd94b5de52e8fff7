"""LightningModules. Each model lives in its own module so that importing one never imports another's libraries."""

from fiberaug.models.base import GenerativeModule, load_generator

__all__ = ["GenerativeModule", "load_generator"]
