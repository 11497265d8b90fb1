"""Data: the built-in "shapes" benchmark (with exact object masks), users' image files and
folders, class names, export to PNG folders and data spec strings."""

from .export import export_dataset
from .images import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    load_images,
    read_class_names,
    read_image,
    read_mask,
)
from .shapes import SHAPE_CLASSES, SPLITS, ShapeSample, ShapesDataset
from .sources import open_dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "SHAPE_CLASSES",
    "SPLITS",
    "ImageFolderDataset",
    "ShapeSample",
    "ShapesDataset",
    "export_dataset",
    "load_images",
    "open_dataset",
    "read_class_names",
    "read_image",
    "read_mask",
]
