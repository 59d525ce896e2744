"""Own COCO-format datasets, registered from config keys without writing code.

Set DATASETS.COCO_FORMAT.TRAIN_JSON / TRAIN_IMAGES (and TEST_JSON / TEST_IMAGES): the annotation file
and the folder its ``file_name`` entries are relative to. They are registered as ``coco_format_train``
/ ``coco_format_test`` and become DATASETS.TRAIN / DATASETS.TEST; class names come from the JSON's
categories (sorted by id, as Detectron2's COCO loader orders them).
"""
import json
import logging
import os
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["register_coco_format_datasets", "coco_category_names"]

logger = logging.getLogger(__name__)

SPLITS = {"TRAIN": "coco_format_train", "TEST": "coco_format_test"}


def coco_category_names(json_file: str) -> List[str]:
    """Category names of a COCO annotation file, in the order of their ids."""
    with open(json_file) as f:
        try:
            categories = json.load(f).get("categories")
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file} is not valid JSON ({e}); a COCO annotation file is expected") from e
    if not categories:
        raise ValueError(f"{json_file} has no 'categories': a COCO annotation file lists its classes there")
    return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]


def register_coco_format_datasets(cfg) -> None:
    """Register the datasets named by DATASETS.COCO_FORMAT and point DATASETS.TRAIN / TEST at them.
    ``cfg`` must not be frozen."""
    keys = cfg.DATASETS.COCO_FORMAT
    for split, name in SPLITS.items():
        json_file, image_root = keys[f"{split}_JSON"], keys[f"{split}_IMAGES"]
        if not json_file and not image_root:
            continue
        if not json_file or not image_root:
            raise ValueError(
                f"Set both DATASETS.COCO_FORMAT.{split}_JSON and DATASETS.COCO_FORMAT.{split}_IMAGES "
                f"(got {json_file!r} and {image_root!r})"
            )
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"DATASETS.COCO_FORMAT.{split}_JSON: no such file: {json_file}")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"DATASETS.COCO_FORMAT.{split}_IMAGES: no such folder: {image_root}")
        classes = coco_category_names(json_file)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {"thing_classes": classes}, json_file, image_root)
        setattr(cfg.DATASETS, split, (name,))
        logger.info(f"Registered {name!r} from {json_file} ({len(classes)} classes: {', '.join(classes)})")
