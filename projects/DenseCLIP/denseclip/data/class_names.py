"""The class names a DenseCLIP model prompts its text encoder with."""
from typing import List, Sequence, Union

from detectron2.data import MetadataCatalog

__all__ = ["metadata_classes_key", "parse_vocabulary", "resolve_class_names"]


def metadata_classes_key(cfg) -> str:
    """The metadata field naming the model's classes: stuff_classes for semantic segmentors, else thing_classes."""
    from .dataset_mapper import is_semantic_segmentation

    return "stuff_classes" if is_semantic_segmentation(cfg) else "thing_classes"


def resolve_class_names(cfg) -> List[str]:
    """MODEL.DENSECLIP.CLASS_NAMES, or else the class names of the first training (or test) dataset:
    its stuff_classes for semantic segmentors, its thing_classes for detectors."""
    if cfg.MODEL.DENSECLIP.CLASS_NAMES:
        return list(cfg.MODEL.DENSECLIP.CLASS_NAMES)
    datasets = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if not datasets:
        raise ValueError(
            "DenseCLIP needs class names for its prompts: set DATASETS.TRAIN (or DATASETS.TEST) to a "
            "registered dataset, or list them in MODEL.DENSECLIP.CLASS_NAMES"
        )
    key = metadata_classes_key(cfg)
    classes = MetadataCatalog.get(datasets[0]).get(key, None)
    if not classes:
        raise ValueError(
            f"Dataset {datasets[0]!r} has no {key} in its metadata. Register it (for a COCO "
            f"JSON: DATASETS.COCO_FORMAT.*, or detectron2.data.datasets.register_coco_instances) before "
            f"building the model, or list the names in MODEL.DENSECLIP.CLASS_NAMES"
        )
    return list(classes)


def parse_vocabulary(names: Union[str, Sequence[str]]) -> List[str]:
    """
    The names of a vocabulary (names to compute score maps of), given as a list of names or as one
    string of comma-separated names (demo.py's --vocabulary), each stripped of surrounding spaces.

    Raises:
        ValueError for an empty vocabulary or an empty name; TypeError for a name that is not a string.
    """
    if isinstance(names, str):
        names = names.split(",")
    names = list(names)
    not_strings = [name for name in names if not isinstance(name, str)]
    if not_strings:
        raise TypeError(f"Vocabulary names must be strings, got {not_strings!r}")
    stripped = [name.strip() for name in names]
    if not stripped:
        raise ValueError("The vocabulary is empty: give at least one name (or none at all for the detector's classes)")
    empty = [str(position) for position, name in enumerate(stripped, 1) if not name]
    if empty:
        raise ValueError(
            f"The vocabulary {names!r} has an empty name (position {', '.join(empty)}): give each name "
            f"between commas, or drop the empty ones"
        )
    return stripped
