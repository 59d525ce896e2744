"""Detectron2's DatasetMapper with image-reading errors that name the file and the fix, and its
semantic-segmentation version with the release's input pipeline."""
import copy
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import detectron2.data.transforms as T
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager

from .resize import ResizeShortestEdgeWithBackend, build_detection_augmentations, get_resize_backend
from .transforms import PhotometricDistortion, RandomScaleResize

__all__ = ["DenseCLIPDatasetMapper", "SemSegDatasetMapper", "read_label_map"]


class DenseCLIPDatasetMapper(DatasetMapper):
    """Same as :class:`DatasetMapper`, with the resizes of INPUT.RESIZE_BACKEND
    (:func:`~denseclip.data.resize.build_detection_augmentations`); a missing or undecodable image
    raises an OSError naming it."""

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        augmentations = build_detection_augmentations(cfg, is_train)
        if cfg.INPUT.CROP.ENABLED and is_train:  # as DatasetMapper: the crop first
            augmentations.insert(0, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
        ret["augmentations"] = augmentations
        return ret

    def __call__(self, dataset_dict):
        try:
            return self.map(dataset_dict)
        except OSError as e:  # FileNotFoundError, PIL.UnidentifiedImageError, truncated files
            file_name = dataset_dict.get("file_name", "<no file_name>")
            raise OSError(
                f"Cannot read image {file_name} (image_id {dataset_dict.get('image_id', '?')}): {e}. "
                f"Restore or replace the file, or remove its entry from the dataset's annotation file."
            ) from e

    def map(self, dataset_dict):
        return super().__call__(dataset_dict)


def read_label_map(file_name: str, dtype=None) -> np.ndarray:
    """H x W class indices of a single-channel label image (a palette PNG gives its indices, not its
    colours). Also SemSegEvaluator's ``sem_seg_loading_fn``: its default fails under NumPy 2."""
    with PathManager.open(file_name, "rb") as f:
        labels = np.asarray(Image.open(f), dtype=dtype)
    if labels.ndim != 2:
        raise ValueError(
            f"Label map {file_name} has {labels.shape[2]} channels; a label map is a single-channel (or "
            f"palette) PNG whose pixels are class indices. Convert colour-coded maps to indices first."
        )
    return labels


class SemSegDatasetMapper(DenseCLIPDatasetMapper):
    """
    Maps a sem-seg dataset dict (``file_name``, ``sem_seg_file_name``) to ``image`` (3 x H x W) and
    ``sem_seg`` (H x W long) through ``augmentations`` (from a config, their resizes interpolate as
    INPUT.RESIZE_BACKEND says); checks that every label is a class index below ``num_classes`` or
    ``ignore_value``. With ``pad_size`` (training with absolute crops, as
    the release pads after cropping), images smaller than it are padded at the bottom and right
    with ``pad_pixel`` (the pixel mean, so 0 once the model normalises; the image becomes float32)
    and their labels with ``ignore_value``.
    """

    @configurable
    def __init__(self, is_train: bool, *, augmentations: List, image_format: str, num_classes: int,
                 ignore_value: int = 255, pad_size: Optional[Tuple[int, int]] = None,
                 pad_pixel: Sequence[float] = (0.0, 0.0, 0.0)):
        super().__init__(is_train, augmentations=augmentations, image_format=image_format)
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.pad_size = tuple(pad_size) if pad_size else None
        self.pad_pixel = torch.tensor(pad_pixel, dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        backend = get_resize_backend(cfg)
        if not is_train:  # the release's test resize: short side 512, long side at most 2048, keep ratio
            # (none with MIN_SIZE_TEST 0, Detectron2's convention: multi-scale testing resizes itself)
            augmentations = [
                ResizeShortestEdgeWithBackend(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, backend=backend)
            ] if cfg.INPUT.MIN_SIZE_TEST > 0 else []
        else:
            augmentations = [RandomScaleResize(cfg.INPUT.SCALE_TRAIN, cfg.INPUT.SCALE_RATIO_RANGE_TRAIN, backend)]
            if cfg.INPUT.CROP.ENABLED:
                augmentations.append(T.RandomCrop_CategoryAreaConstraint(
                    cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA, ignore_value
                ))
            if cfg.INPUT.RANDOM_FLIP != "none":
                augmentations.append(T.RandomFlip(
                    horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal", vertical=cfg.INPUT.RANDOM_FLIP == "vertical"
                ))
            distortion = cfg.INPUT.PHOTOMETRIC_DISTORTION
            if distortion.ENABLED:
                augmentations.append(PhotometricDistortion(
                    distortion.BRIGHTNESS_DELTA, distortion.CONTRAST_RANGE, distortion.SATURATION_RANGE,
                    distortion.HUE_DELTA, cfg.INPUT.FORMAT,
                ))
        pad = is_train and cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute"
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_value": ignore_value,
            "pad_size": tuple(cfg.INPUT.CROP.SIZE) if pad else None,
            "pad_pixel": cfg.MODEL.PIXEL_MEAN,
        }

    def _check_labels(self, labels: np.ndarray, file_name: str) -> None:
        values = np.unique(labels)
        bad = values[(values >= self.num_classes) & (values != self.ignore_value)]
        if len(bad):
            raise ValueError(
                f"Label map {file_name} has value(s) {bad.tolist()[:10]}, outside the class indices 0..{self.num_classes - 1} "
                f"(MODEL.SEM_SEG_HEAD.NUM_CLASSES {self.num_classes}) and not the ignore value "
                f"{self.ignore_value} (MODEL.SEM_SEG_HEAD.IGNORE_VALUE). Fix the file, or set the class count or "
                f"ignore value the maps use."
            )

    def map(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        label_file = dataset_dict.pop("sem_seg_file_name")
        labels = read_label_map(label_file)
        self._check_labels(labels, label_file)
        if labels.shape != image.shape[:2]:
            raise ValueError(
                f"Label map {label_file} is {labels.shape[1]} x {labels.shape[0]} but its image "
                f"{dataset_dict['file_name']} is {image.shape[1]} x {image.shape[0]} (width x height); they must match"
            )
        aug_input = T.AugInput(image, sem_seg=labels)
        self.augmentations(aug_input)
        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        labels = torch.as_tensor(aug_input.sem_seg.astype("long"))
        if self.pad_size is not None:
            image, labels = self._pad(image, labels)
        dataset_dict["image"], dataset_dict["sem_seg"] = image, labels
        return dataset_dict

    def _pad(self, image: torch.Tensor, labels: torch.Tensor):
        """Pads to ``pad_size`` at the bottom and right: image with ``pad_pixel``, labels with ``ignore_value``."""
        height, width = labels.shape
        bottom, right = max(self.pad_size[0] - height, 0), max(self.pad_size[1] - width, 0)
        padded = self.pad_pixel.expand(image.shape[0], height + bottom, width + right).clone()
        padded[:, :height, :width] = image
        return padded, F.pad(labels, (0, right, 0, bottom), value=self.ignore_value)
