from . import datasets  # noqa: F401  (registers the generated dataset)
from .config import _add_to_detectron2_defaults, add_input_config
from .class_names import parse_vocabulary, resolve_class_names
from .dataset_mapper import DenseCLIPDatasetMapper, SemSegDatasetMapper, is_semantic_segmentation, read_label_map
from .resize import (
    OpenCVResizeTransform, ResizeShortestEdgeWithBackend, build_detection_augmentations, build_test_resize,
    get_resize_backend, resize_transform,
)
from .datasets import register_coco_format_datasets, register_datasets_from_config, register_sem_seg_folder_datasets

_add_to_detectron2_defaults()  # transitional: until add_denseclip_config calls add_input_config (see config.py)
