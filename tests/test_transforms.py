"""The release's segmentation pipeline as Detectron2 augmentations, against the MMSegmentation 0.19 rules
restated here: resize to (2048, 512) x ratio keeping the aspect ratio, crops with at most 75% of one
class, photometric distortion, padding to the crop size; and the mapper that applies them."""
import colorsys

import cv2
import numpy as np
import pytest
import torch

import detectron2.data.transforms as T

from denseclip import get_denseclip_cfg
from denseclip.data import SemSegDatasetMapper
from denseclip.data.transforms import (
    PhotometricDistortion, PhotometricDistortionTransform, RandomScaleResize, scale_resize_shape,
)


# (h, w), scale (long, short) -> (h, w): factor = min(long / long side, short / short side), sides
# rounded half up, worked out by hand.
@pytest.mark.parametrize("shape, scale, expected", [
    ((512, 683), (2048, 512), (512, 683)),  # already fits: factor 1
    ((375, 500), (2048, 512), (512, 683)),  # factor 512/375 = 1.3653: 500 x 1.3653 = 682.67
    ((800, 600), (2048, 512), (683, 512)),  # portrait: the short side is the width; 800 x 0.8533 = 682.67
    ((100, 1000), (2048, 512), (205, 2048)),  # the long side limits: factor 2.048, 204.8 -> 205
    ((375, 500), (1024, 256), (256, 341)),  # ratio 0.5: factor 0.68267, 341.33 -> 341
    ((375, 500), (4096, 1024), (1024, 1365)),  # ratio 2: factor 2.7307, 1365.33 -> 1365
])
def test_scale_resize_shape_table(shape, scale, expected):
    assert scale_resize_shape(*shape, scale) == expected


def test_random_scale_resize_draws_the_ratio_and_keeps_the_aspect_ratio():
    image = np.zeros((375, 500, 3), np.uint8)
    fixed = T.AugInput(image.copy())
    T.AugmentationList([RandomScaleResize((2048, 512), (0.5, 0.5))])(fixed)
    assert fixed.image.shape[:2] == (256, 341)  # the ratio-0.5 row above

    np.random.seed(0)
    augmentation = RandomScaleResize((2048, 512), (0.5, 2.0))
    short_sides = []
    for _ in range(200):
        resize = augmentation.get_transform(image)
        h, w = resize.new_h, resize.new_w
        short_sides.append(h)
        # r in [0.5, 2]: the short side int(512 r) limits a 4:3 image; width follows the ratio
        assert 256 <= h <= 1024 and abs(w - h * 500 / 375) <= 1
    assert min(short_sides) < 320 and max(short_sides) > 960  # the whole range is drawn


def _colour_step(rgb, hue_shift_cv=0, saturation=None):
    """One HSV step on an RGB pixel, by hand with colorsys on OpenCV's uint8 HSV scale (H in units of 2
    degrees, 0-179; S and V 0-255), S scaled and truncated like the release's convert()."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    h_cv, s_cv, v_cv = round(h * 180), round(s * 255), round(v * 255)
    if saturation is not None:
        s_cv = int(min(max(s_cv * saturation, 0), 255))
    h_cv = (h_cv + hue_shift_cv) % 180
    return np.array(colorsys.hsv_to_rgb(h_cv / 180, s_cv / 255, v_cv / 255)) * 255


PIXELS = np.array([[[200, 100, 50], [10, 250, 128], [128, 128, 128]]], np.uint8)  # 1 x 3 RGB


@pytest.mark.parametrize("brightness, contrast, expected", [
    (40.6, None, [[240, 140, 90], [50, 255, 168], [168, 168, 168]]),  # add, clip at 255, truncate
    (-40.6, None, [[159, 59, 9], [0, 209, 87], [87, 87, 87]]),  # clip at 0
    (None, 1.5, [[255, 150, 75], [15, 255, 192], [192, 192, 192]]),  # multiply
    (None, 0.55, [[110, 55, 27], [5, 137, 70], [70, 70, 70]]),  # 27.5 -> 27: truncated, not rounded
])
def test_brightness_and_contrast_by_hand(brightness, contrast, expected):
    transform = PhotometricDistortionTransform(brightness, contrast, True, None, None)
    assert transform.apply_image(PIXELS.copy()).tolist() == [expected]


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
@pytest.mark.parametrize("saturation, hue", [(0.5, None), (None, 10), (None, -18), (1.4, 17)])
def test_saturation_and_hue_by_hand(image_format, saturation, hue):
    """In either channel order, the HSV steps change the same colour as colorsys does by hand (within
    OpenCV's 8-bit rounding); a grey pixel has no saturation or hue to change."""
    pixels = PIXELS if image_format == "RGB" else PIXELS[:, :, ::-1].copy()
    out = PhotometricDistortionTransform(None, None, True, saturation, hue, image_format).apply_image(pixels)
    out_rgb = out if image_format == "RGB" else out[:, :, ::-1]
    for pixel, result in zip(PIXELS[0], out_rgb[0]):
        expected = _colour_step(pixel.tolist(), hue or 0, saturation)
        assert np.abs(result.astype(float) - expected).max() <= 1.5, (pixel, result, expected)
    assert out_rgb[0, 2].tolist() == [128, 128, 128]
    # e.g. (200, 100, 50) is H 20 deg: +10 units (20 deg) -> 40 deg keeps R and B, G = 50 + 150 x 2/3
    if hue == 10:
        assert np.abs(out_rgb[0, 0].astype(int) - [200, 150, 50]).max() <= 1


def test_contrast_before_or_after_the_colour_steps():
    """Contrast then hue differs from hue then contrast when contrast clips (each step is checked above)."""
    first = PhotometricDistortionTransform(None, 1.5, True, None, 30, "RGB").apply_image(PIXELS.copy())
    last = PhotometricDistortionTransform(None, 1.5, False, None, 30, "RGB").apply_image(PIXELS.copy())
    hue_only = PhotometricDistortionTransform(None, None, True, None, 30, "RGB")
    contrast_only = PhotometricDistortionTransform(None, 1.5, True, None, None, "RGB")
    assert np.array_equal(first, hue_only.apply_image(contrast_only.apply_image(PIXELS.copy())))
    assert np.array_equal(last, contrast_only.apply_image(hue_only.apply_image(PIXELS.copy())))
    assert not np.array_equal(first, last)


def _release_draws():
    """The parameters MMSegmentation 0.19's PhotoMetricDistortion draws, in its order, from NumPy's
    global generator: brightness coin (+ value), contrast mode, [contrast coin (+ value) if mode 1],
    saturation coin (+ value), hue coin (+ value), [contrast coin (+ value) if mode 0]."""
    brightness = np.random.uniform(-32, 32) if np.random.randint(2) else None
    mode = np.random.randint(2)
    contrast = (np.random.uniform(0.5, 1.5) if np.random.randint(2) else None) if mode == 1 else None
    saturation = np.random.uniform(0.5, 1.5) if np.random.randint(2) else None
    hue = np.random.randint(-18, 18) if np.random.randint(2) else None
    if mode == 0:
        contrast = np.random.uniform(0.5, 1.5) if np.random.randint(2) else None
    return brightness, contrast, mode == 1, saturation, hue


def test_photometric_distortion_draws_like_the_release():
    augmentation = PhotometricDistortion(32, (0.5, 1.5), (0.5, 1.5), 18, "RGB")
    image = np.zeros((4, 4, 3), np.uint8)
    drawn = []
    for seed in range(400):
        np.random.seed(seed)
        t = augmentation.get_transform(image)
        np.random.seed(seed)
        assert (t.brightness, t.contrast, t.contrast_first, t.saturation, t.hue) == _release_draws()
        drawn.append(t)
    # each step about half the time; hue integers in [-18, 17]
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert 0.4 < np.mean([getattr(t, name) is not None for t in drawn]) < 0.6
    hues = {t.hue for t in drawn if t.hue is not None}
    assert min(hues) == -18 and max(hues) == 17
    assert 0.4 < np.mean([t.contrast_first for t in drawn]) < 0.6


def _crop_passes(labels, y, x, size, max_ratio=0.75, ignore=255):
    """The release's check: more than one class, none with max_ratio or more of the counted pixels."""
    window = labels[y : y + size, x : x + size]
    counts = np.bincount(window[window != ignore].ravel())
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() < max_ratio * counts.sum()


def test_category_area_crop_on_a_dominant_class():
    """Class 0 fills a 100 x 100 map but for a 30 x 30 square of class 1 (and a band of ignored pixels):
    a 40 x 40 crop passes at few positions (fraction p); redrawn up to 10 times, a crop passes with
    probability 1 - (1 - p)^10, against p for one draw."""
    labels = np.zeros((100, 100), np.uint8)
    labels[5:35, 5:35] = 1
    labels[60:, :] = 255  # ignored: never counted, so crops down there hold one class and fail
    size = 40
    positions = [(y, x) for y in range(100 - size + 1) for x in range(100 - size + 1)]
    p = np.mean([_crop_passes(labels, y, x, size) for y, x in positions])
    assert 0.05 < p < 0.3
    image = np.zeros((100, 100, 3), np.uint8)

    def pass_rate(max_area, trials=300):
        # the mapper's crop, as the config builds it (the ignore value from MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
        cfg = _mapper_cfg(**{"INPUT.CROP.SIZE": (size, size), "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": max_area})
        (augmentation,) = [a for a in SemSegDatasetMapper(cfg, is_train=True).augmentations.augs
                           if isinstance(a, T.RandomCrop_CategoryAreaConstraint)]
        np.random.seed(0)
        passed = 0
        for _ in range(trials):
            crop = augmentation.get_transform(image, labels)
            assert (crop.h, crop.w) == (size, size)
            passed += _crop_passes(labels, crop.y0, crop.x0, size)
        return passed / trials

    expected = 1 - (1 - p) ** 10
    assert abs(pass_rate(0.75) - expected) < 0.08
    assert abs(pass_rate(1.0) - p) < 0.06


def _mapper_cfg(**overrides):
    opts = {
        "MODEL.META_ARCHITECTURE": "SemanticSegmentor", "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 3,
        "INPUT.SCALE_TRAIN": (160, 120), "INPUT.SCALE_RATIO_RANGE_TRAIN": (1.0, 1.0),
        "INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": (128, 128),
        "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": 1.0, "INPUT.RANDOM_FLIP": "none",
        "INPUT.MIN_SIZE_TEST": 512, "INPUT.MAX_SIZE_TEST": 2048, "INPUT.FORMAT": "RGB",
        "MODEL.PIXEL_MEAN": [122.7709383, 116.7460125, 104.09373615], **overrides,
    }
    return get_denseclip_cfg("", [str(v) if not isinstance(v, str) else v for kv in opts.items() for v in kv])


@pytest.fixture
def image_and_labels(tmp_path):
    """A 60 x 80 image and its label map (classes 0-2, a few ignored pixels), as files."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (60, 80)).astype(np.uint8)
    labels[:5, :5] = 255
    cv2.imwrite(str(tmp_path / "a.png"), image[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "a_label.png"), labels)
    record = {"file_name": str(tmp_path / "a.png"), "sem_seg_file_name": str(tmp_path / "a_label.png")}
    return image, labels, record


def test_train_mapper_resizes_crops_and_pads(image_and_labels):
    """60 x 80 at scale (160, 120), ratio 1: factor min(160/80, 120/60) = 2 -> 120 x 160; a 128 x 128 crop
    is 120 x 128 of it (the height is smaller), padded at the bottom to 128 x 128 with the pixel mean and
    label 255."""
    _, labels, record = image_and_labels
    cfg = _mapper_cfg()
    out = SemSegDatasetMapper(cfg, is_train=True)(record)
    image, sem_seg = out["image"], out["sem_seg"]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    assert sem_seg.shape == (128, 128) and sem_seg.dtype == torch.long
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    assert torch.equal(image[:, 120:], mean.expand(3, 8, 128))  # 0 after the model's normalisation
    assert (sem_seg[120:] == 255).all()
    upscaled = np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1)  # nearest, factor 2
    offsets = [x for x in range(160 - 128 + 1) if np.array_equal(sem_seg[:120].numpy(), upscaled[:, x : x + 128])]
    assert len(offsets) >= 1


def test_test_mapper_resizes_short_side_512_long_side_at_most_2048(image_and_labels, tmp_path):
    _, _, record = image_and_labels
    out = SemSegDatasetMapper(_mapper_cfg(), is_train=False)(record)
    assert out["image"].shape == (3, 512, 683) and out["image"].dtype == torch.uint8  # 80 x 512/60 = 682.67
    assert out["sem_seg"].shape == (512, 683)
    wide = np.zeros((10, 100), np.uint8)
    cv2.imwrite(str(tmp_path / "wide.png"), wide)
    out = SemSegDatasetMapper(_mapper_cfg(), is_train=False)(
        {"file_name": str(tmp_path / "wide.png"), "sem_seg_file_name": str(tmp_path / "wide.png")})
    assert out["image"].shape == (3, 205, 2048)  # 512/10 would make it 5120 wide: 2048/100 -> 204.8


def test_mapper_refuses_labels_out_of_range(image_and_labels, tmp_path):
    _, labels, record = image_and_labels
    labels = labels.copy()
    labels[30, 40] = 7
    cv2.imwrite(record["sem_seg_file_name"], labels)
    with pytest.raises(ValueError, match=r"a_label.png has value\(s\) \[7\].*0..2.*NUM_CLASSES 3.*IGNORE_VALUE"):
        SemSegDatasetMapper(_mapper_cfg(), is_train=False)(record)
    cv2.imwrite(record["sem_seg_file_name"], np.zeros((60, 80, 3), np.uint8))
    with pytest.raises(ValueError, match="3 channels; a label map is a single-channel"):
        SemSegDatasetMapper(_mapper_cfg(), is_train=True)(record)

