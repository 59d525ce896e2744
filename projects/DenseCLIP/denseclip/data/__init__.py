from . import datasets  # noqa: F401  (registers the generated dataset)
from .class_names import parse_vocabulary, resolve_class_names
from .dataset_mapper import DenseCLIPDatasetMapper
from .datasets import register_coco_format_datasets
