"""The class names a DenseCLIP model prompts its text encoder with."""
from typing import List

from detectron2.data import MetadataCatalog

__all__ = ["resolve_class_names"]


def resolve_class_names(cfg, key: str) -> List[str]:
    """MODEL.DENSECLIP.CLASS_NAMES, or else the class names of the first training (or test) dataset: its
    metadata field ``key`` (stuff_classes for semantic segmentors, thing_classes for detectors)."""
    if cfg.MODEL.DENSECLIP.CLASS_NAMES:
        return list(cfg.MODEL.DENSECLIP.CLASS_NAMES)
    datasets = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if not datasets:
        raise ValueError(
            "DenseCLIP needs class names for its prompts: set DATASETS.TRAIN (or DATASETS.TEST) to a "
            "registered dataset, or list them in MODEL.DENSECLIP.CLASS_NAMES"
        )
    classes = MetadataCatalog.get(datasets[0]).get(key, None)
    if not classes:
        raise ValueError(
            f"Dataset {datasets[0]!r} has no {key} in its metadata. Register it (for a COCO "
            f"JSON: DATASETS.COCO_FORMAT.*, or detectron2.data.datasets.register_coco_instances) before "
            f"building the model, or list the names in MODEL.DENSECLIP.CLASS_NAMES"
        )
    return list(classes)

