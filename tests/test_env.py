"""The warnings PyTorch gives about Detectron2's code on every run are silenced once denseclip is imported,
and only those."""
import os
import subprocess
import sys

import torch

from helpers import REPO

# Each call site of Detectron2 (and PyTorch) that warns although nothing is wrong, run as a user's run does.
TRIGGERS = """
import torch
import detectron2.modeling  # torch.jit.script at import (box regression, fvcore's focal loss)
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
DefaultAnchorGenerator(sizes=[[32]], aspect_ratios=[[1.0]], strides=[8])([torch.zeros(1, 1, 2, 2)])  # meshgrid
from detectron2.utils.tracing import is_fx_tracing
is_fx_tracing()  # Detectron2's ROI pooler asks this
import torch.utils.cpp_extension  # Detectron2's environment report, with CUDA_HOME set and no GPU
import warnings
warnings.warn("a warning of this project")  # not silenced
"""

MESSAGES = [
    "`torch.jit.script` is deprecated",
    "torch.meshgrid: in an upcoming release",
    "is_fx_tracing will return true",
    "No CUDA runtime is found",
]


def run(code, tmp_path):
    env = dict(os.environ, CUDA_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_expected_warnings_are_silenced_and_others_are_not(tmp_path):
    expected = MESSAGES if not torch.cuda.is_available() else MESSAGES[:3]
    before = run(TRIGGERS, tmp_path)  # the same calls without denseclip: every message is there
    assert all(message in before for message in expected), before
    after = run("import denseclip\n" + TRIGGERS, tmp_path)
    assert not [message for message in MESSAGES if message in after], after
    assert "a warning of this project" in after


def test_importing_detectron2_first_works(tmp_path):
    """A user's script may import Detectron2 before denseclip: the models build and run, and the warnings
    raised while they run are silenced as well. (Only the notices Detectron2 raises while it is imported
    come before the filters exist; the repository's scripts import denseclip first for that reason alone.)"""
    code = """
import torch
import detectron2.engine, detectron2.modeling  # first
import denseclip
from denseclip import get_denseclip_cfg
from detectron2.modeling import build_model
cfg = get_denseclip_cfg("configs/Shapes-Detection/retinanet_denseclip_tiny_FPN.yaml", ["MODEL.DENSECLIP.RETURN_SCORE_MAPS", "True"])
model = build_model(cfg).eval()
with torch.no_grad():
    (out,) = model([{"image": torch.rand(3, 64, 64) * 255, "vocabulary": "moon, sun"}])
print("score maps", tuple(out["score_maps"].shape))
"""
    stderr = run(code, tmp_path)
    assert "torch.meshgrid: in an upcoming release" not in stderr  # raised by the anchors, while running
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "score maps (2, 64, 64)" in result.stdout
