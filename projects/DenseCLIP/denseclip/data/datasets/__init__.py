"""Datasets registered with Detectron2 when this package is imported."""
from . import shapes  # noqa: F401  (registers "shapes_train" and "shapes_val")
from .coco_format import coco_category_names, register_coco_format_datasets
