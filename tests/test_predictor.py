"""DenseCLIPPredictor: what it feeds the model, its vocabularies, and the device it is configured for."""
import os
import threading

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.engine import default_argument_parser

from denseclip.modeling import parse_vocabulary
from denseclip.engine import DenseCLIPPredictor

from helpers import REPO, TINY_SHAPES_CONFIGS, load_script, run_in_threads, tiny_detector_cfg

# (as given, the names): a list is taken as it is, a string is split at commas; spaces around names go.
VOCABULARIES = [
    (["cat", "dog"], ["cat", "dog"]),
    (["traffic cone", " dog "], ["traffic cone", "dog"]),
    ("cat,dog", ["cat", "dog"]),
    ("cat, dog,traffic cone", ["cat", "dog", "traffic cone"]),
    ("teapot", ["teapot"]),
    (("a, b",), ["a, b"]),  # a list's names keep their commas
]


@pytest.mark.parametrize("given,names", VOCABULARIES)
def test_parse_vocabulary(given, names):
    assert parse_vocabulary(given) == names


@pytest.mark.parametrize("given", [[""], ["cat", "  "], "cat,,dog", "cat,", "", []])
def test_empty_vocabulary_or_name_is_refused(given):
    with pytest.raises(ValueError, match="empty"):
        parse_vocabulary(given)


def test_names_must_be_strings():
    with pytest.raises(TypeError, match="strings"):
        parse_vocabulary(["cat", 3])


@pytest.fixture(scope="module")
def cfg():
    return tiny_detector_cfg("mask_rcnn")


def test_predictor_splits_a_vocabulary_string_as_the_demo_does(cfg):
    """Not one map per character: the string is split at commas, like demo.py's --vocabulary."""
    predictor = DenseCLIPPredictor(cfg, vocabulary="cat, dog,traffic cone")
    assert predictor.score_map_names == ["cat", "dog", "traffic cone"]


@pytest.mark.parametrize("vocabulary", [[""], "cat,,dog", []])
def test_predictor_refuses_empty_names(cfg, vocabulary):
    with pytest.raises(ValueError, match="empty"):
        DenseCLIPPredictor(cfg, vocabulary=vocabulary)


CUDA_ADVICE = "MODEL.DEVICE is cuda but no GPU is available: add MODEL.DEVICE cpu"


def test_cuda_device_without_gpu_gets_the_same_advice_everywhere(monkeypatch):
    """The predictor (so the README's snippet), demo.py and train_net.py say the same, before building
    anything; PyTorch alone would say 'Found no NVIDIA driver'."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_detector_cfg("mask_rcnn")
    cfg.MODEL.DEVICE = "cuda"
    with pytest.raises(ValueError, match=CUDA_ADVICE):
        DenseCLIPPredictor(cfg)
    config = os.path.join(REPO, TINY_SHAPES_CONFIGS["mask_rcnn"])
    demo = load_script("demo/demo.py")
    with pytest.raises(ValueError, match=CUDA_ADVICE):
        demo.main(["--config-file", config, "--input", "unused.png", "--opts", "MODEL.DEVICE", "cuda"])
    train_net = load_script("train_net.py")
    args = default_argument_parser().parse_args(["--config-file", config, "MODEL.DEVICE", "cuda"])
    with pytest.raises(SystemExit, match=CUDA_ADVICE):
        train_net.setup(args)


def resized_as(backend: str, rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """The resize rule of INPUT.RESIZE_BACKEND written down: PIL's bilinear filter (Detectron2's
    ResizeTransform) or cv2.resize with INTER_LINEAR (the release's)."""
    if backend == "opencv":
        return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.array(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


@pytest.mark.parametrize("backend", ["pil", "opencv"])
@pytest.mark.parametrize("size", [(64, 96), (32, 48), (128, 192)])
def test_predictor_output_is_the_models_on_the_rgb_image_resized(cfg, size, backend):
    """A BGR image in: the model's output for the RGB image resized as INPUT.MIN_SIZE_TEST 64 /
    MAX_SIZE_TEST 96 and INPUT.RESIZE_BACKEND say (32 x 48 -> 64 x 96 enlarges, 128 x 192 shrinks), at
    the original size."""
    cfg = cfg.clone()
    cfg.INPUT.RESIZE_BACKEND = backend
    predictor = DenseCLIPPredictor(cfg, score_maps=True)
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    rgb = resized_as(backend, np.ascontiguousarray(image[:, :, ::-1]), 96, 64)
    inputs = {"image": torch.as_tensor(np.array(rgb)).permute(2, 0, 1).float(), "height": size[0], "width": size[1]}
    with torch.no_grad():
        (expected,) = predictor.model([inputs])
    output = predictor(image)
    assert output["instances"].image_size == size and output["score_maps"].shape == (3, *size)
    torch.testing.assert_close(output["score_maps"], expected["score_maps"])
    torch.testing.assert_close(output["instances"].pred_boxes.tensor, expected["instances"].pred_boxes.tensor)
    torch.testing.assert_close(output["instances"].scores, expected["instances"].scores)


def test_vocabulary_per_call_leaves_nothing_on_the_model(cfg):
    """A call's vocabulary gives that call's score maps (named in the output), and the next call without
    one gets the predictor's own again: nothing is left on the model."""
    predictor = DenseCLIPPredictor(cfg, score_maps=True)
    image = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    classes = predictor(image)
    words = predictor(image, vocabulary="moon, red ring")
    again = predictor(image)
    assert classes["score_map_names"] == again["score_map_names"] == ["cat", "dog", "traffic light"]
    assert words["score_map_names"] == ["moon", "red ring"] and words["score_maps"].shape == (2, 64, 96)
    torch.testing.assert_close(again["score_maps"], classes["score_maps"])
    single = predictor(image, vocabulary=["red ring"])
    assert single["score_maps"].shape == (1, 64, 96)


def test_concurrent_calls_each_get_their_own_vocabulary(cfg):
    """Two threads calling one predictor at once with different vocabularies (as two browser tabs of the
    demo app do) each get the maps a lone call gives for their names."""
    predictor = DenseCLIPPredictor(cfg, score_maps=True)
    image = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    vocabularies = ["moon, sun", "cat, traffic cone, teapot"]
    alone = {v: predictor(image, vocabulary=v)["score_maps"] for v in vocabularies}
    results, barrier = {}, threading.Barrier(2)

    def call(vocabulary):
        barrier.wait()
        for _ in range(3):
            results.setdefault(vocabulary, []).append(predictor(image, vocabulary=vocabulary))

    run_in_threads(call, vocabularies)
    for vocabulary in vocabularies:
        for output in results[vocabulary]:
            assert output["score_map_names"] == [n.strip() for n in vocabulary.split(",")]
            torch.testing.assert_close(output["score_maps"], alone[vocabulary])
