"""
Every resize of the input pipeline, with the interpolation backend chosen by INPUT.RESIZE_BACKEND.

The rule, for an image of h x w resized to new_h x new_w (the size itself is computed elsewhere, each
side rounded as ``int(side * scale + 0.5)``, the same in Detectron2 and in the release):

* ``"pil"`` (the default): Detectron2's ``ResizeTransform``. uint8 images go through PIL's bilinear
  filter, which antialiases when shrinking (its support widens with the scale) and rounds its own way
  when enlarging; other dtypes through ``torch.nn.functional.interpolate`` (bilinear,
  ``align_corners=False``); label maps through PIL's nearest neighbour.
* ``"opencv"``: the release's (MMDetection 2.17 / MMSegmentation 0.19 call ``mmcv.imrescale`` /
  ``mmcv.imresize``, i.e. OpenCV): images are ``cv2.resize(image, (new_w, new_h),
  interpolation=cv2.INTER_LINEAR)`` (no antialiasing, OpenCV's fixed-point arithmetic for uint8),
  label maps ``cv2.INTER_NEAREST``, in training and testing. See :class:`OpenCVResizeTransform`.

Coordinates (boxes, polygons, keypoints) are scaled by new_w / w and new_h / h with either backend.

:func:`resize_transform` is the one factory every resize goes through (the mappers' augmentations, the
predictor, multi-scale testing, the exporter's sample); :class:`ResizeShortestEdgeWithBackend` is
Detectron2's ``ResizeShortestEdge`` (same size rule, same random draws) on it, and
:func:`build_test_resize` the test resize of INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST that
``DenseCLIPPredictor`` applies. The exported graphs' stand-alone runner (tools/deploy/exported_predictor.py)
repeats the rule without this package.
"""
import sys
from typing import List

import cv2
import numpy as np
from PIL import Image

import detectron2.data.transforms as T
from detectron2.data.transforms import ResizeTransform

__all__ = [
    "RESIZE_BACKENDS",
    "OpenCVResizeTransform",
    "ResizeShortestEdgeWithBackend",
    "build_detection_augmentations",
    "build_test_resize",
    "check_resize_backend",
    "get_resize_backend",
    "resize_transform",
]

RESIZE_BACKENDS = ("pil", "opencv")

# Image dtypes cv2.resize interpolates bilinearly.
_LINEAR_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)
# Label-map dtypes cv2.resize's nearest neighbour returns unchanged (it turns int64 into int32).
_NEAREST_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_)


def check_resize_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`RESIZE_BACKENDS`, else a ValueError naming the config key."""
    if backend not in RESIZE_BACKENDS:
        raise ValueError(
            f"INPUT.RESIZE_BACKEND must be 'pil' (Detectron2's ResizeTransform) or 'opencv' (the release's "
            f"cv2.resize, bilinear images and nearest-neighbour label maps), got {backend!r}"
        )
    return backend


def get_resize_backend(cfg) -> str:
    """INPUT.RESIZE_BACKEND of ``cfg``, checked; "pil" for a config made without the key."""
    return check_resize_backend(cfg.INPUT.get("RESIZE_BACKEND", "pil"))


def _nearest(labels: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """cv2.INTER_NEAREST of ``labels`` for any dtype: cv2 itself where it keeps the dtype, else the
    source row and column cv2 picks for each output pixel (found by resizing index ramps) gathered."""
    if labels.dtype.type in _NEAREST_DTYPES and (labels.ndim == 2 or labels.shape[2] <= 4):
        out = cv2.resize(np.ascontiguousarray(labels), (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        return out[:, :, None] if labels.ndim == 3 and out.ndim == 2 else out
    height, width = labels.shape[:2]
    cols = cv2.resize(np.arange(width, dtype=np.float32)[None], (new_w, 1), interpolation=cv2.INTER_NEAREST)
    rows = cv2.resize(np.arange(height, dtype=np.float32)[:, None], (1, new_h), interpolation=cv2.INTER_NEAREST)
    return labels[rows.reshape(-1).astype(np.int64)[:, None], cols.reshape(-1).astype(np.int64)[None, :]]


class OpenCVResizeTransform(ResizeTransform):
    """
    Resize as the release does (``mmcv.imresize``, OpenCV): the image with ``cv2.resize(img, (new_w,
    new_h), interpolation=cv2.INTER_LINEAR)``, label maps with ``cv2.INTER_NEAREST``; coordinates are
    scaled by new_w / w and new_h / h (Detectron2's ``ResizeTransform.apply_coords``, inherited, as are
    rotated boxes). Images: H x W or H x W x C (C = 1 stays a channel axis), uint8, uint16, int16,
    float32 or float64; the dtype is kept. Label maps: any dtype (cv2's own nearest neighbour where it
    keeps the dtype, the same pixels picked otherwise).

    A subclass of Detectron2's ``ResizeTransform`` (same attributes h, w, new_h, new_w, ``interp``
    fixed to bilinear), so code that inspects resizes treats it as one.
    """

    def __init__(self, h: int, w: int, new_h: int, new_w: int):
        sizes = {"h": h, "w": w, "new_h": new_h, "new_w": new_w}
        bad = {k: v for k, v in sizes.items() if int(v) != v or v < 1}
        if bad:
            raise ValueError(f"Resize sizes must be positive integers, got {bad} (of {sizes})")
        super().__init__(int(h), int(w), int(new_h), int(new_w), Image.BILINEAR)

    def _check_shape(self, img: np.ndarray, what: str) -> None:
        if img.ndim not in (2, 3):
            raise ValueError(f"OpenCVResizeTransform resizes H x W or H x W x C {what}s, got shape {img.shape}")
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(
                f"This resize was made for a {self.h} x {self.w} (h x w) {what}, got {img.shape[0]} x {img.shape[1]}: "
                f"get a transform for this {what} from the augmentation (get_transform) instead"
            )

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        """``cv2.resize`` bilinear (``interp`` None or PIL's BILINEAR), or nearest (PIL's NEAREST, as
        Detectron2's ``ResizeTransform.apply_segmentation`` asks)."""
        if interp == Image.NEAREST:
            return self.apply_segmentation(img)
        if interp not in (None, Image.BILINEAR):
            raise ValueError(
                f"OpenCVResizeTransform interpolates bilinearly (images) or nearest (labels), not {interp!r}"
            )
        self._check_shape(img, "image")
        if img.dtype.type not in _LINEAR_DTYPES:
            raise TypeError(
                f"cv2.resize cannot interpolate a {img.dtype} image bilinearly: convert it to uint8 or float32 "
                f"(or use INPUT.RESIZE_BACKEND pil)"
            )
        if img.ndim == 3 and not 1 <= img.shape[2] <= 128:
            raise ValueError(f"cv2.resize takes 1 to 128 channels, got an image of shape {img.shape}")
        out = cv2.resize(np.ascontiguousarray(img), (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR)
        return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out  # cv2 drops a single channel

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        self._check_shape(segmentation, "label map")
        return _nearest(segmentation, self.new_h, self.new_w)

    def inverse(self) -> "OpenCVResizeTransform":
        return OpenCVResizeTransform(self.new_h, self.new_w, self.h, self.w)


def resize_transform(h: int, w: int, new_h: int, new_w: int, backend: str = "pil") -> ResizeTransform:
    """The resize of an h x w image to new_h x new_w with ``backend`` (INPUT.RESIZE_BACKEND): Detectron2's
    ``ResizeTransform`` (bilinear, PIL for uint8) for "pil", :class:`OpenCVResizeTransform` for "opencv"."""
    if check_resize_backend(backend) == "opencv":
        return OpenCVResizeTransform(h, w, new_h, new_w)
    return ResizeTransform(h, w, new_h, new_w)


class ResizeShortestEdgeWithBackend(T.ResizeShortestEdge):
    """
    Detectron2's ``ResizeShortestEdge`` (the shorter side to a drawn length, the longer at most
    ``max_size``, each side rounded as int(x + 0.5); the same random draws) whose resize is
    :func:`resize_transform` with ``backend``.
    """

    def __init__(self, short_edge_length, max_size: int = sys.maxsize, sample_style: str = "range",
                 backend: str = "pil"):
        super().__init__(short_edge_length, max_size, sample_style)
        self.backend = check_resize_backend(backend)

    def get_transform(self, image):
        transform = super().get_transform(image)
        if isinstance(transform, ResizeTransform):  # else a NoOpTransform (a drawn length of 0)
            return resize_transform(transform.h, transform.w, transform.new_h, transform.new_w, self.backend)
        return transform


def build_test_resize(cfg) -> ResizeShortestEdgeWithBackend:
    """The inference resize of DenseCLIPPredictor (and of the exporter's sample): shorter side
    INPUT.MIN_SIZE_TEST, longer at most INPUT.MAX_SIZE_TEST, with INPUT.RESIZE_BACKEND."""
    return ResizeShortestEdgeWithBackend(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST, backend=get_resize_backend(cfg)
    )


def build_detection_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """Detectron2's ``detection_utils.build_augmentation`` (shortest-edge resize of INPUT.MIN_SIZE_* /
    MAX_SIZE_*, sampled as INPUT.MIN_SIZE_TRAIN_SAMPLING in training, "choice" in testing; then the
    INPUT.RANDOM_FLIP flip in training) with the resize of INPUT.RESIZE_BACKEND."""
    backend = get_resize_backend(cfg)
    if is_train:
        sizes = (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    else:
        sizes = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
    augmentations = [ResizeShortestEdgeWithBackend(*sizes, backend=backend)]
    if is_train and cfg.INPUT.RANDOM_FLIP != "none":
        augmentations.append(T.RandomFlip(
            horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal", vertical=cfg.INPUT.RANDOM_FLIP == "vertical"
        ))
    return augmentations
