"""INPUT.RESIZE_BACKEND: "opencv" resizes as the release (mmcv.imrescale / imresize, i.e. cv2.resize with
INTER_LINEAR for images and INTER_NEAREST for label maps), checked against cv2.resize called here, through
the transform, the shortest-edge resize, RandomScaleResize and both mappers; "pil" is still Detectron2's
ResizeTransform."""
import glob
import os

import cv2
import numpy as np
import pytest
import torch

import detectron2.data.transforms as T
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper

from denseclip import add_denseclip_config, get_denseclip_cfg
from denseclip.config import add_input_config
from denseclip.data import (
    DenseCLIPDatasetMapper, OpenCVResizeTransform, ResizeShortestEdgeWithBackend, SemSegDatasetMapper,
    build_detection_augmentations, build_test_resize, get_resize_backend, resize_transform,
)
from denseclip.data.transforms import RandomScaleResize

from helpers import REPO

# (h, w) -> (new_h, new_w): enlarging by a non-integer factor, shrinking by one, and exactly halving
# (where OpenCV's INTER_LINEAR takes its area-averaging shortcut; the release gets the same).
SIZES = {"enlarge": ((9, 13), (20, 29)), "shrink": ((40, 52), (17, 23)), "halve": ((40, 52), (20, 26))}
# H x W x 3 colour, H x W x 1 and H x W grey; uint8 and float32.
LAYOUTS = {"colour": (3,), "grey_channel": (1,), "grey": ()}


def cv2_linear(image, new_h, new_w):
    """The release's image resize, restated: mmcv.imresize(img, (w, h)) = cv2.resize INTER_LINEAR."""
    out = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return out[:, :, None] if image.ndim == 3 and out.ndim == 2 else out


def cv2_nearest(labels, new_h, new_w):
    """mmseg 0.19's label resize: mmcv.imrescale(gt_seg, ..., interpolation='nearest')."""
    return cv2.resize(labels, (new_w, new_h), interpolation=cv2.INTER_NEAREST)


def random_image(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return (rng.random(shape) * 255).astype(np.float32)


def cfg_with(**opts):
    """Detectron2's config with DenseCLIP's keys."""
    cfg = get_cfg()
    add_denseclip_config(cfg)
    cfg.merge_from_list([x for kv in opts.items() for x in (kv[0].replace("__", "."), str(kv[1]))])
    return cfg


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("size", sorted(SIZES))
def test_opencv_transform_is_cv2_resize_linear(size, layout, dtype):
    (h, w), (new_h, new_w) = SIZES[size]
    image = random_image((h, w) + LAYOUTS[layout], dtype)
    out = OpenCVResizeTransform(h, w, new_h, new_w).apply_image(image)
    assert out.shape == (new_h, new_w) + LAYOUTS[layout] and out.dtype == dtype
    assert np.array_equal(out, cv2_linear(image, new_h, new_w))
    # A flipped (negatively strided) view, as after a flip, gives the same as its contiguous copy.
    flipped = image[:, ::-1]
    assert np.array_equal(OpenCVResizeTransform(h, w, new_h, new_w).apply_image(flipped),
                          cv2_linear(np.ascontiguousarray(flipped), new_h, new_w))


def test_pil_and_opencv_differ_on_uint8_shrinking():
    """The reason for the key: PIL's bilinear filter antialiases when shrinking, OpenCV's does not."""
    (h, w), (new_h, new_w) = SIZES["shrink"]
    image = random_image((h, w, 3), np.uint8)
    pil = T.ResizeTransform(h, w, new_h, new_w).apply_image(image)
    opencv = OpenCVResizeTransform(h, w, new_h, new_w).apply_image(image)
    assert pil.shape == opencv.shape and np.abs(pil.astype(int) - opencv.astype(int)).max() > 10


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
@pytest.mark.parametrize("size", sorted(SIZES))
def test_label_maps_are_cv2_nearest(size, dtype):
    (h, w), (new_h, new_w) = SIZES[size]
    labels = np.random.default_rng(1).integers(0, 150, (h, w)).astype(np.uint8)
    labels[:3] = 255
    out = OpenCVResizeTransform(h, w, new_h, new_w).apply_segmentation(labels.astype(dtype))
    assert out.dtype == dtype and out.shape == (new_h, new_w)
    # cv2 turns int64 into int32 (the dtype is kept here); the values are cv2's nearest neighbour's.
    assert np.array_equal(out, cv2_nearest(labels, new_h, new_w))
    assert set(np.unique(out)) <= set(np.unique(labels))  # no interpolated label values


def test_coordinates_inverse_and_bad_input():
    t = OpenCVResizeTransform(40, 52, 17, 23)
    coords = np.array([[0.0, 0.0], [52.0, 40.0], [13.0, 10.0]])
    expected = coords * [23 / 52, 17 / 40]  # x by new_w / w, y by new_h / h
    assert np.allclose(t.apply_coords(coords.copy()), expected)
    assert np.allclose(t.apply_coords(coords.copy()), T.ResizeTransform(40, 52, 17, 23).apply_coords(coords.copy()))
    box = t.apply_box(np.array([[13.0, 10.0, 26.0, 20.0]]))
    assert np.allclose(box, [[13 * 23 / 52, 10 * 17 / 40, 26 * 23 / 52, 20 * 17 / 40]])
    inverse = t.inverse()
    assert isinstance(inverse, OpenCVResizeTransform)
    assert (inverse.h, inverse.w, inverse.new_h, inverse.new_w) == (17, 23, 40, 52)
    assert np.allclose(inverse.apply_coords(t.apply_coords(coords.copy())), coords)
    assert isinstance(t, T.ResizeTransform)  # code that looks for resizes finds it
    with pytest.raises(ValueError, match=r"made for a 40 x 52 \(h x w\) image, got 41 x 52"):
        t.apply_image(np.zeros((41, 52, 3), np.uint8))
    with pytest.raises(TypeError, match="cannot interpolate a int64 image.*convert it to uint8 or float32"):
        t.apply_image(np.zeros((40, 52), np.int64))
    with pytest.raises(ValueError, match="positive integers"):
        OpenCVResizeTransform(40, 52, 0, 23)


def test_factory_backends_and_the_config_key():
    (h, w), (new_h, new_w) = SIZES["shrink"]
    image = random_image((h, w, 3), np.uint8)
    pil = resize_transform(h, w, new_h, new_w, "pil")
    assert type(pil) is T.ResizeTransform  # the default is Detectron2's, unchanged
    assert np.array_equal(pil.apply_image(image), T.ResizeTransform(h, w, new_h, new_w).apply_image(image))
    opencv = resize_transform(h, w, new_h, new_w, "opencv")
    assert np.array_equal(opencv.apply_image(image), cv2_linear(image, new_h, new_w))
    with pytest.raises(ValueError, match=r"INPUT.RESIZE_BACKEND must be 'pil' .* or 'opencv' .*got 'cv2'"):
        resize_transform(h, w, new_h, new_w, "cv2")
    cfg = get_cfg()
    add_input_config(cfg)
    assert cfg.INPUT.RESIZE_BACKEND == "pil" and get_resize_backend(cfg) == "pil"
    cfg.INPUT.RESIZE_BACKEND = "Pillow"
    with pytest.raises(ValueError, match="INPUT.RESIZE_BACKEND"):
        get_resize_backend(cfg)


def test_configs_state_their_backend():
    """The COCO and ADE20K configs (the release's recipe) resize as the release; the Shapes configs with PIL."""
    configs = sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.yaml")))
    assert len(configs) >= 20
    for path in configs:
        folder = os.path.basename(os.path.dirname(path))
        expected = "pil" if folder.startswith("Shapes-") else "opencv"
        assert folder.split("-")[0] in ("COCO", "ADE20K", "Shapes"), path
        assert get_denseclip_cfg(path).INPUT.RESIZE_BACKEND == expected, path


@pytest.mark.parametrize("shape, short, max_size, expected", [
    ((9, 13, 3), 20, 1000, (20, 29)),  # enlarge: 13 x 20/9 = 28.9 -> 29
    ((40, 52), 17, 1000, (17, 22)),  # shrink, grey: 52 x 17/40 = 22.1 -> 22
    ((10, 40, 3), 20, 60, (15, 60)),  # the long side limits: 80 > 60, so 20 x 60/80 = 15
])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_shortest_edge_resize(shape, short, max_size, expected, dtype):
    image = random_image(shape, dtype)
    t = ResizeShortestEdgeWithBackend(short, max_size, backend="opencv").get_transform(image)
    assert (t.new_h, t.new_w) == expected
    assert np.array_equal(t.apply_image(image), cv2_linear(image, *expected))
    pil = ResizeShortestEdgeWithBackend(short, max_size, backend="pil").get_transform(image)
    reference = T.ResizeShortestEdge(short, max_size).get_transform(image)
    assert type(pil) is T.ResizeTransform and np.array_equal(pil.apply_image(image), reference.apply_image(image))


def test_shortest_edge_resize_draws_as_detectron2():
    image = np.zeros((30, 40, 3), np.uint8)
    ours, theirs = [], []
    for aug, sizes in ((ResizeShortestEdgeWithBackend((16, 48), 1000, "range", "opencv"), ours),
                       (T.ResizeShortestEdge((16, 48), 1000, "range"), theirs)):
        np.random.seed(3)
        sizes += [(t.new_h, t.new_w) for t in (aug.get_transform(image) for _ in range(20))]
    assert ours == theirs and len(set(ours)) > 5
    cfg = cfg_with(INPUT__MIN_SIZE_TEST=20, INPUT__MAX_SIZE_TEST=1000, INPUT__RESIZE_BACKEND="opencv")
    test_resize = build_test_resize(cfg)
    t = test_resize.get_transform(image)
    assert isinstance(t, OpenCVResizeTransform) and (t.new_h, t.new_w) == (20, 27)  # 40 x 20/30 = 26.7


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("scale, expected", [
    ((80, 60), (60, 80)),  # enlarge: factor min(80/40, 60/30) = 2
    ((36, 22), (22, 29)),  # shrink: factor min(36/40, 22/30) = 0.733: 29.3 -> 29
])
def test_random_scale_resize_opencv(scale, expected, dtype):
    image = random_image((30, 40, 3), dtype)
    labels = np.random.default_rng(2).integers(0, 5, (30, 40)).astype(np.uint8)
    aug_input = T.AugInput(image, sem_seg=labels)
    T.AugmentationList([RandomScaleResize(scale, (1.0, 1.0), backend="opencv")])(aug_input)
    assert np.array_equal(aug_input.image, cv2_linear(image, *expected))
    assert np.array_equal(aug_input.sem_seg, cv2_nearest(labels, *expected))
    pil = RandomScaleResize(scale, (1.0, 1.0)).get_transform(image)  # default: pil
    assert type(pil) is T.ResizeTransform and (pil.new_h, pil.new_w) == expected
    with pytest.raises(ValueError, match="INPUT.RESIZE_BACKEND"):
        RandomScaleResize(scale, (1.0, 1.0), backend="bilinear")


@pytest.fixture
def files(tmp_path):
    """A 30 x 40 colour PNG and its 30 x 40 label map (classes 0-2, a few 255), as files and pixels (RGB)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (30, 40)).astype(np.uint8)
    labels[:2, :4] = 255
    cv2.imwrite(str(tmp_path / "a.png"), image[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "a_label.png"), labels)
    record = {"file_name": str(tmp_path / "a.png"), "sem_seg_file_name": str(tmp_path / "a_label.png"),
              "height": 30, "width": 40, "image_id": 0}
    return image, labels, record


def detection_cfg(backend, **extra):
    opts = dict(INPUT__MIN_SIZE_TRAIN="(45,)", INPUT__MAX_SIZE_TRAIN=1000, INPUT__MIN_SIZE_TEST=20,
                INPUT__MAX_SIZE_TEST=1000, INPUT__RANDOM_FLIP="none", INPUT__FORMAT="RGB")
    return cfg_with(**{**opts, **extra, "INPUT__RESIZE_BACKEND": backend})


def test_detection_mapper_opencv(files):
    image, _, record = files
    # test: shorter side 20 (shrink), 40 x 20/30 = 26.7 -> 27
    out = DenseCLIPDatasetMapper(detection_cfg("opencv"), is_train=False)(dict(record))
    assert torch.equal(out["image"], torch.as_tensor(cv2_linear(image, 20, 27).transpose(2, 0, 1).copy()))
    # training: shorter side 45 (enlarge), 40 x 1.5 = 60; a box is scaled by 60/40 and 45/30
    annotation = {"bbox": [4.0, 6.0, 20.0, 12.0], "bbox_mode": 0, "category_id": 0}
    out = DenseCLIPDatasetMapper(detection_cfg("opencv"), is_train=True)(dict(record, annotations=[annotation]))
    assert torch.equal(out["image"], torch.as_tensor(cv2_linear(image, 45, 60).transpose(2, 0, 1).copy()))
    assert torch.allclose(out["instances"].gt_boxes.tensor, torch.tensor([[6.0, 9.0, 30.0, 18.0]]))


def test_detection_mapper_augmentations_are_detectron2_s_with_the_backend(files):
    _, _, record = files
    cfg = detection_cfg("opencv", INPUT__RANDOM_FLIP="horizontal", INPUT__MIN_SIZE_TRAIN="(40, 50)",
                        INPUT__MIN_SIZE_TRAIN_SAMPLING="range")
    resize, flip = build_detection_augmentations(cfg, is_train=True)
    assert isinstance(resize, ResizeShortestEdgeWithBackend) and resize.backend == "opencv"
    assert resize.is_range and tuple(resize.short_edge_length) == (40, 50) and resize.max_size == 1000
    assert isinstance(flip, T.RandomFlip) and flip.horizontal
    (test_resize,) = build_detection_augmentations(cfg, is_train=False)
    assert not test_resize.is_range and test_resize.max_size == 1000
    # the "pil" mapper gives Detectron2's DatasetMapper's output, draws included
    cfg = detection_cfg("pil", INPUT__RANDOM_FLIP="horizontal", INPUT__MIN_SIZE_TRAIN="(40, 50)",
                        INPUT__MIN_SIZE_TRAIN_SAMPLING="range")
    annotation = {"bbox": [4.0, 6.0, 20.0, 12.0], "bbox_mode": 0, "category_id": 0}
    for is_train in (True, False):
        for seed in range(3):
            np.random.seed(seed)
            ours = DenseCLIPDatasetMapper(cfg, is_train=is_train)(dict(record, annotations=[annotation]))
            np.random.seed(seed)
            theirs = DatasetMapper(cfg, is_train=is_train)(dict(record, annotations=[annotation]))
            assert torch.equal(ours["image"], theirs["image"])
            if is_train:
                assert torch.equal(ours["instances"].gt_boxes.tensor, theirs["instances"].gt_boxes.tensor)


def sem_seg_cfg(backend, **extra):
    opts = dict(MODEL__META_ARCHITECTURE="SemanticSegmentor", MODEL__SEM_SEG_HEAD__NUM_CLASSES=3,
                INPUT__SCALE_TRAIN="(80, 60)", INPUT__SCALE_RATIO_RANGE_TRAIN="(1.0, 1.0)",
                INPUT__CROP__ENABLED=False, INPUT__RANDOM_FLIP="none", INPUT__MIN_SIZE_TEST=20,
                INPUT__MAX_SIZE_TEST=1000, INPUT__FORMAT="RGB")
    return cfg_with(**{**opts, **extra, "INPUT__RESIZE_BACKEND": backend})


def test_sem_seg_mapper_opencv(files):
    image, labels, record = files
    # test: shorter side 20 -> 20 x 27 (shrink)
    out = SemSegDatasetMapper(sem_seg_cfg("opencv"), is_train=False)(dict(record))
    assert torch.equal(out["image"], torch.as_tensor(cv2_linear(image, 20, 27).transpose(2, 0, 1).copy()))
    assert torch.equal(out["sem_seg"], torch.as_tensor(cv2_nearest(labels, 20, 27).astype(np.int64)))
    # training at ratio 1: scale (80, 60), factor 2 -> 60 x 80 (enlarge); no crop, flip or distortion
    out = SemSegDatasetMapper(sem_seg_cfg("opencv"), is_train=True)(dict(record))
    assert torch.equal(out["image"], torch.as_tensor(cv2_linear(image, 60, 80).transpose(2, 0, 1).copy()))
    assert torch.equal(out["sem_seg"], torch.as_tensor(cv2_nearest(labels, 60, 80).astype(np.int64)))
    # shrinking in training: scale (36, 22) -> factor 0.733, 22 x 29
    out = SemSegDatasetMapper(sem_seg_cfg("opencv", INPUT__SCALE_TRAIN="(36, 22)"), is_train=True)(dict(record))
    assert torch.equal(out["image"], torch.as_tensor(cv2_linear(image, 22, 29).transpose(2, 0, 1).copy()))
    assert torch.equal(out["sem_seg"], torch.as_tensor(cv2_nearest(labels, 22, 29).astype(np.int64)))


def test_sem_seg_mapper_pil_is_detectron2_s_resize(files):
    image, labels, record = files
    for is_train, (new_h, new_w) in ((False, (20, 27)), (True, (60, 80))):
        out = SemSegDatasetMapper(sem_seg_cfg("pil"), is_train=is_train)(dict(record))
        resize = T.ResizeTransform(30, 40, new_h, new_w)
        assert torch.equal(out["image"], torch.as_tensor(resize.apply_image(image).transpose(2, 0, 1).copy()))
        assert torch.equal(out["sem_seg"], torch.as_tensor(resize.apply_segmentation(labels).astype(np.int64)))
