"""DenseCLIPPredictor: what it feeds the model, its vocabularies, and the device it is configured for."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.engine import default_argument_parser

from denseclip.data import parse_vocabulary
from denseclip.engine import DenseCLIPPredictor

from helpers import REPO, TINY_SHAPES_CONFIGS, load_script, tiny_detector_cfg

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


@pytest.mark.parametrize("size", [(64, 96), (32, 48)])
def test_predictor_output_is_the_models_on_the_rgb_image_resized(cfg, size):
    """A BGR image in: the model's output for the RGB image resized as INPUT.MIN_SIZE_TEST 64 /
    MAX_SIZE_TEST 96 say (PIL bilinear, as Detectron2's ResizeShortestEdge; 32 x 48 -> 64 x 96), at the
    original size."""
    predictor = DenseCLIPPredictor(cfg, score_maps=True)
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    rgb = Image.fromarray(np.ascontiguousarray(image[:, :, ::-1])).resize((96, 64), Image.BILINEAR)
    inputs = {"image": torch.as_tensor(np.array(rgb)).permute(2, 0, 1).float(), "height": size[0], "width": size[1]}
    with torch.no_grad():
        (expected,) = predictor.model([inputs])
    output = predictor(image)
    assert output["instances"].image_size == size and output["score_maps"].shape == (3, *size)
    torch.testing.assert_close(output["score_maps"], expected["score_maps"])
    torch.testing.assert_close(output["instances"].pred_boxes.tensor, expected["instances"].pred_boxes.tensor)
    torch.testing.assert_close(output["instances"].scores, expected["instances"].scores)
