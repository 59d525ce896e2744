"""Datasets registered with Detectron2 when this package is imported, and own data from config keys."""
from . import shapes  # noqa: F401  (registers "shapes_{train,val}" and "shapes_sem_seg_{train,val}")
from .ade20k import check_ade20k_prepared, prepare_ade20k
from .coco_format import coco_category_names, register_coco_format_datasets
from .sem_seg_folders import register_sem_seg_folder_datasets


def register_datasets_from_config(cfg) -> None:
    """Registers own data named by config keys (DATASETS.COCO_FORMAT.*, DATASETS.SEM_SEG_FOLDERS.*) and
    points DATASETS.TRAIN / TEST at it. ``cfg`` must not be frozen. Then stops, naming
    tools/prepare_ade20k.py, if DATASETS.TRAIN / TEST name Detectron2's ADE20K whose download has not
    been converted (:func:`check_ade20k_prepared`)."""
    register_coco_format_datasets(cfg)
    register_sem_seg_folder_datasets(cfg)
    check_ade20k_prepared(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
