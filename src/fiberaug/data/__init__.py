"""Images in: folders and bundled data sets, decoded, split and augmented on the fly."""

from typing import Any

from fiberaug.data.images import IMAGE_EXTENSIONS, list_folder, list_images, read_image, to_channels
from fiberaug.data.pipelines import build_transforms, sized_pipeline

# The DataModules import Lightning, which tools that only read and write images (augment.py) do not need.
_DATAMODULES = ("DigitsDataModule", "FolderDataModule", "ImageDataModule")

__all__ = [
    "IMAGE_EXTENSIONS",
    "DigitsDataModule",
    "FolderDataModule",
    "ImageDataModule",
    "build_transforms",
    "list_folder",
    "list_images",
    "read_image",
    "sized_pipeline",
    "to_channels",
]


def __getattr__(name: str) -> Any:
    if name in _DATAMODULES:
        from fiberaug.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
