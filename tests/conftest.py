"""Shared fixtures: random-weight CLIP models built with open_clip, saved like real checkpoints."""
import logging

import open_clip
import pytest
import torch

logging.getLogger("root").setLevel(logging.ERROR)  # open_clip's "no pretrained weights" notice


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """open_clip zero-initialises each block's last BN; give every BN non-trivial values instead."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


def build_open_clip(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(open_clip.create_model(name, pretrained=None), seed).eval()


def save_torchscript(model: torch.nn.Module, path) -> None:
    """Save like OpenAI's released archives: a traced TorchScript module."""
    image = torch.zeros(1, 3, 224, 224)
    text = open_clip.get_tokenizer("RN50")(["a photo"])
    torch.jit.trace(model, (image, text), check_trace=False).save(str(path))


@pytest.fixture(scope="session")
def open_clip_rn50():
    return build_open_clip("RN50")


@pytest.fixture(scope="session")
def rn50_checkpoints(open_clip_rn50, tmp_path_factory):
    """The same random RN50 saved as an OpenAI-style TorchScript archive and as a state dict."""
    folder = tmp_path_factory.mktemp("clip_rn50")
    torchscript, state_dict = folder / "RN50.pt", folder / "RN50_open_clip.bin"
    save_torchscript(open_clip_rn50, torchscript)
    torch.save(open_clip_rn50.state_dict(), state_dict)
    return {"torchscript": str(torchscript), "state_dict": str(state_dict)}
