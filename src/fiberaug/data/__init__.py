"""Images in: folders and bundled data sets, decoded, split and augmented on the fly."""

from fiberaug.data.datamodule import DigitsDataModule, FolderDataModule, ImageDataModule
from fiberaug.data.images import IMAGE_EXTENSIONS, list_images, read_image, to_channels
from fiberaug.data.pipelines import build_transforms, sized_pipeline

__all__ = [
    "IMAGE_EXTENSIONS",
    "DigitsDataModule",
    "FolderDataModule",
    "ImageDataModule",
    "build_transforms",
    "list_images",
    "read_image",
    "sized_pipeline",
    "to_channels",
]
