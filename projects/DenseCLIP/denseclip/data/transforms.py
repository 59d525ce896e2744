"""The release's semantic-segmentation augmentations (MMSegmentation 0.19's ``Resize`` with
``ratio_range`` and ``PhotoMetricDistortion``) as Detectron2 augmentations.

Both draw their random numbers from NumPy's global generator in the same order as MMSegmentation,
so that the same seed gives the same parameters.
"""
from typing import Optional, Tuple

import cv2
import numpy as np

from detectron2.data.transforms import Augmentation, NoOpTransform, Transform

from .resize import check_resize_backend, resize_transform

__all__ = ["RandomScaleResize", "PhotometricDistortion", "PhotometricDistortionTransform", "scale_resize_shape"]


def scale_resize_shape(height: int, width: int, scale: Tuple[float, float]) -> Tuple[int, int]:
    """
    The (height, width) that keeps the aspect ratio and fits ``scale`` = (long, short) as
    MMCV's ``imrescale`` does: factor = min(long / max(h, w), short / min(h, w)) (up or down),
    each side rounded half up.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class RandomScaleResize(Augmentation):
    """
    Resize keeping the aspect ratio to a randomly scaled target (MMSegmentation's ``Resize`` with
    ``img_scale`` and ``ratio_range``): draws r uniformly from ``ratio_range``, takes the target
    (int(scale[0] * r), int(scale[1] * r)) and resizes to :func:`scale_resize_shape` of it. The
    release: scale (2048, 512), ratios 0.5-2.0. Pixels are interpolated by
    :func:`~denseclip.data.resize.resize_transform` with ``backend`` (INPUT.RESIZE_BACKEND): "pil",
    Detectron2's ``ResizeTransform``, or "opencv", the release's cv2.resize (bilinear image,
    nearest-neighbour labels with both).
    """

    def __init__(self, scale: Tuple[int, int], ratio_range: Tuple[float, float], backend: str = "pil"):
        super().__init__()
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {tuple(ratio_range)}")
        check_resize_backend(backend)
        self._init(locals())

    def get_transform(self, image):
        low, high = self.ratio_range
        ratio = np.random.random_sample() * (high - low) + low
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        height, width = image.shape[:2]
        new_height, new_width = scale_resize_shape(height, width, target)
        return resize_transform(height, width, new_height, new_width, self.backend)


class PhotometricDistortionTransform(Transform):
    """
    A drawn photometric distortion of a uint8 image (labels and coordinates unchanged), in this
    order: brightness (add ``brightness``), contrast (multiply by ``contrast``) if
    ``contrast_first``, saturation (multiply HSV's S by ``saturation``), hue (add ``hue`` to
    OpenCV's H, modulo 180), contrast if not ``contrast_first``. A step whose parameter is None is
    skipped. Each multiply-add works in float32, clips to [0, 255] and truncates to uint8.
    """

    def __init__(self, brightness: Optional[float], contrast: Optional[float], contrast_first: bool,
                 saturation: Optional[float], hue: Optional[int], image_format: str = "RGB"):
        super().__init__()
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"PhotometricDistortion needs an RGB or BGR image, got INPUT.FORMAT {image_format!r}")
        self._set_attributes(locals())

    @staticmethod
    def _multiply_add(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _to_hsv(self, image):
        return cv2.cvtColor(image, cv2.COLOR_RGB2HSV if self.image_format == "RGB" else cv2.COLOR_BGR2HSV)

    def _from_hsv(self, image):
        return cv2.cvtColor(image, cv2.COLOR_HSV2RGB if self.image_format == "RGB" else cv2.COLOR_HSV2BGR)

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.dtype != np.uint8:
            raise TypeError(f"PhotometricDistortion works on uint8 images, got {img.dtype}")
        if self.brightness is not None:
            img = self._multiply_add(img, beta=self.brightness)
        if self.contrast_first and self.contrast is not None:
            img = self._multiply_add(img, alpha=self.contrast)
        if self.saturation is not None:
            hsv = self._to_hsv(img)
            hsv[:, :, 1] = self._multiply_add(hsv[:, :, 1], alpha=self.saturation)
            img = self._from_hsv(hsv)
        if self.hue is not None:
            hsv = self._to_hsv(img)
            hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + self.hue) % 180
            img = self._from_hsv(hsv)
        if not self.contrast_first and self.contrast is not None:
            img = self._multiply_add(img, alpha=self.contrast)
        return img

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


class PhotometricDistortion(Augmentation):
    """
    MMSegmentation's ``PhotoMetricDistortion``: brightness, contrast, saturation and hue changes,
    each applied with probability 0.5, contrast before or after the colour steps with probability
    0.5 each. Brightness adds a uniform value in [-brightness_delta, brightness_delta]; contrast
    and saturation multiply by a uniform value in their ranges; hue adds an integer in
    [-hue_delta, hue_delta - 1] (NumPy's ``randint`` excludes the upper bound) to OpenCV's H (0-179).
    """

    def __init__(self, brightness_delta: float = 32, contrast_range: Tuple[float, float] = (0.5, 1.5),
                 saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18,
                 image_format: str = "RGB"):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        if image.ndim != 3 or image.shape[2] != 3:
            return NoOpTransform()  # no colour to distort
        # Drawn in MMSegmentation's order: brightness, the contrast position, then each step in turn.
        brightness = np.random.uniform(-self.brightness_delta, self.brightness_delta) if np.random.randint(2) else None
        contrast_first = np.random.randint(2) == 1
        contrast = self._draw_contrast() if contrast_first else None
        saturation = np.random.uniform(*self.saturation_range) if np.random.randint(2) else None
        hue = int(np.random.randint(-self.hue_delta, self.hue_delta)) if np.random.randint(2) else None
        if not contrast_first:
            contrast = self._draw_contrast()
        return PhotometricDistortionTransform(brightness, contrast, contrast_first, saturation, hue, self.image_format)

    def _draw_contrast(self) -> Optional[float]:
        return np.random.uniform(*self.contrast_range) if np.random.randint(2) else None
