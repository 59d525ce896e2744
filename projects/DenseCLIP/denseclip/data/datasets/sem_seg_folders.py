"""Own semantic-segmentation data, registered from config keys without writing code.

Set DATASETS.SEM_SEG_FOLDERS.TRAIN_IMAGES / TRAIN_LABELS (and TEST_IMAGES / TEST_LABELS): a folder of
images and a folder of label maps, matched by file name without extension (``a.jpg`` and ``a.png``).
A label map is a single-channel PNG whose pixels hold class indices 0 .. K-1 in the order of
DATASETS.SEM_SEG_FOLDERS.CLASS_NAMES, or MODEL.SEM_SEG_HEAD.IGNORE_VALUE (255) for pixels to ignore.
The splits are registered with Detectron2's ``load_sem_seg`` as ``sem_seg_folders_train`` /
``sem_seg_folders_test`` and become DATASETS.TRAIN / DATASETS.TEST.
"""
import functools
import logging
import os
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg

__all__ = ["register_sem_seg_folder_datasets", "IMAGE_EXTENSIONS"]

logger = logging.getLogger(__name__)

SPLITS = {"TRAIN": "sem_seg_folders_train", "TEST": "sem_seg_folders_test"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXTENSION = ".png"


def _stems(folder: str, extensions, ignore_case: bool) -> dict:
    """{file name without extension: extension} of the files in ``folder`` with one of ``extensions``."""
    stems = {}
    for f in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(f)
        if (ext.lower() if ignore_case else ext) in extensions and os.path.isfile(os.path.join(folder, f)):
            stems[stem] = ext
    return stems


def _examples(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_folders(split: str, image_root: str, label_root: str) -> str:
    """Checks that each image has a label map and vice versa; returns the images' extension."""
    for kind, folder in (("IMAGES", image_root), ("LABELS", label_root)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"DATASETS.SEM_SEG_FOLDERS.{split}_{kind}: no such folder: {folder}")
    images = _stems(image_root, IMAGE_EXTENSIONS, ignore_case=True)
    labels = _stems(label_root, (LABEL_EXTENSION,), ignore_case=False)
    if not images:
        raise ValueError(
            f"DATASETS.SEM_SEG_FOLDERS.{split}_IMAGES: no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_root}"
        )
    extensions = sorted(set(ext for ext in images.values()))
    if len(extensions) > 1:
        raise ValueError(
            f"DATASETS.SEM_SEG_FOLDERS.{split}_IMAGES: {image_root} mixes image types ({', '.join(extensions)}); "
            f"convert them to one type"
        )
    without_label = images.keys() - labels.keys()
    if without_label:
        raise ValueError(
            f"{len(without_label)} image(s) in {image_root} have no label map {LABEL_EXTENSION} of the same name "
            f"in {label_root}: {_examples(without_label)}. Add their label maps or move the images out"
        )
    without_image = labels.keys() - images.keys()
    if without_image:
        raise ValueError(
            f"{len(without_image)} label map(s) in {label_root} have no image of the same name in {image_root}: "
            f"{_examples(without_image)}. Add the images or move the label maps out"
        )
    return extensions[0]


def register_sem_seg_folder_datasets(cfg) -> None:
    """Register the folders named by DATASETS.SEM_SEG_FOLDERS and point DATASETS.TRAIN / TEST at them.
    ``cfg`` must not be frozen. Label values are checked when each map is read (SemSegDatasetMapper)."""
    keys = cfg.DATASETS.SEM_SEG_FOLDERS
    class_names: List[str] = list(keys.CLASS_NAMES)
    for split, name in SPLITS.items():
        image_root, label_root = keys[f"{split}_IMAGES"], keys[f"{split}_LABELS"]
        if not image_root and not label_root:
            continue
        if not image_root or not label_root:
            raise ValueError(
                f"Set both DATASETS.SEM_SEG_FOLDERS.{split}_IMAGES and DATASETS.SEM_SEG_FOLDERS.{split}_LABELS "
                f"(got {image_root!r} and {label_root!r})"
            )
        if not class_names:
            raise ValueError(
                "DATASETS.SEM_SEG_FOLDERS.CLASS_NAMES is empty: list the class names in the order of the label "
                "values 0, 1, ... (e.g. DATASETS.SEM_SEG_FOLDERS.CLASS_NAMES \"['sky', 'road']\")"
            )
        image_ext = _check_folders(split, image_root, label_root)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name, functools.partial(load_sem_seg, label_root, image_root, gt_ext=LABEL_EXTENSION, image_ext=image_ext)
        )
        MetadataCatalog.get(name).set(
            stuff_classes=class_names,
            ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            evaluator_type="sem_seg",
            image_root=image_root,
            sem_seg_root=label_root,
        )
        setattr(cfg.DATASETS, split, (name,))
        logger.info(f"Registered {name!r} from {image_root} and {label_root} ({len(class_names)} classes: "
                    f"{', '.join(class_names)})")
