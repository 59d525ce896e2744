"""Shared fixtures: random-weight CLIP models built with open_clip, saved like real checkpoints."""
import logging

import pytest
import torch

from helpers import build_open_clip, save_torchscript

logging.getLogger("root").setLevel(logging.ERROR)  # open_clip's "no pretrained weights" notice


@pytest.fixture(scope="session")
def open_clip_models():
    """OpenAI's CLIP architectures (QuickGELU) with random weights, built once: {name: model}."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = build_open_clip(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def open_clip_rn50(open_clip_models):
    return open_clip_models("RN50-quickgelu")


@pytest.fixture(scope="session")
def clip_checkpoints(open_clip_models, tmp_path_factory):
    """A random CLIP model saved as an OpenAI-style TorchScript archive and as an open_clip state dict:
    {"torchscript": path, "state_dict": path}, built once per model name."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = open_clip_models(name)
            folder = tmp_path_factory.mktemp(name)
            torchscript, state_dict = folder / f"{name}.pt", folder / f"{name}_open_clip.bin"
            save_torchscript(model, torchscript)
            torch.save(model.state_dict(), state_dict)
            cache[name] = {"torchscript": str(torchscript), "state_dict": str(state_dict)}
        return cache[name]

    return get


@pytest.fixture(scope="session")
def rn50_checkpoints(clip_checkpoints):
    return clip_checkpoints("RN50-quickgelu")
