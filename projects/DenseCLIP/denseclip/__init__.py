"""DenseCLIP (CVPR 2022) for object detection, instance and semantic segmentation on Detectron2."""
from .utils import env as _env  # noqa: F401  (first: silences warnings expected when Detectron2 is imported)
from . import data  # noqa: F401  (registers the generated dataset)
from . import modeling  # noqa: F401  (registers backbones and meta-architectures)
from .checkpoint import DenseCLIPCheckpointer
from .config import add_denseclip_config, check_device, get_denseclip_cfg
from .data import register_coco_format_datasets, register_datasets_from_config
