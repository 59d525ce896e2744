"""DenseCLIPCheckpointer with this project's own trained checkpoints: a prompt that does not fit is refused."""
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from denseclip.checkpoint import DenseCLIPCheckpointer

from helpers import tiny_detector_cfg


def detector(prompt_length=5, num_context=8, seed=0):
    cfg = tiny_detector_cfg("retinanet")
    cfg.MODEL.DENSECLIP.PROMPT_LENGTH, cfg.MODEL.DENSECLIP.NUM_CONTEXT = prompt_length, num_context
    torch.manual_seed(seed)
    return build_model(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint saved as training saves it, with the default prompt: 5 + 8 = 13 positions."""
    folder = tmp_path_factory.mktemp("trained")
    model = detector()
    DetectionCheckpointer(model, str(folder)).save("model_final")
    return model, str(folder / "model_final.pth")


def text_encoder_state(model):
    return {k: v for k, v in model.state_dict().items() if ".text_encoder." in k}


def test_the_trained_prompt_length_loads(trained):
    saved, path = trained
    model = detector(seed=1)
    DenseCLIPCheckpointer(model).load(path)
    expected = text_encoder_state(saved)
    assert expected and all(torch.equal(v, expected[k]) for k, v in text_encoder_state(model).items())


def test_a_longer_prompt_is_refused_with_both_lengths(trained):
    _, path = trained
    with pytest.raises(ValueError) as error:
        DenseCLIPCheckpointer(detector(prompt_length=11)).load(path)
    message = str(error.value)
    assert path in message
    assert "13 token positions (PROMPT_LENGTH 5 + NUM_CONTEXT 8)" in message  # the checkpoint's
    assert "19 (MODEL.DENSECLIP.PROMPT_LENGTH 11 + NUM_CONTEXT 8)" in message  # the config's
    assert "Set MODEL.DENSECLIP.PROMPT_LENGTH 5 and MODEL.DENSECLIP.NUM_CONTEXT 8" in message


def test_other_contexts_with_the_same_positions_are_refused(trained):
    """PROMPT_LENGTH 9 + NUM_CONTEXT 4 also has 13 positions, but other learned contexts."""
    _, path = trained
    with pytest.raises(ValueError, match=r"PROMPT_LENGTH 5 \+ NUM_CONTEXT 8\).*PROMPT_LENGTH 9 \+ NUM_CONTEXT 4\)"):
        DenseCLIPCheckpointer(detector(prompt_length=9, num_context=4)).load(path)
