from . import datasets  # noqa: F401  (registers the generated dataset)
from .class_names import resolve_class_names
from .dataset_mapper import DenseCLIPDatasetMapper, SemSegDatasetMapper, read_label_map
from .datasets import register_coco_format_datasets, register_datasets_from_config, register_sem_seg_folder_datasets
from .resize import (
    OpenCVResizeTransform,
    ResizeShortestEdgeWithBackend,
    build_detection_augmentations,
    build_test_resize,
    get_resize_backend,
    resize_transform,
)
