"""The README's Python snippet runs as written, where the quick start leaves its files, on a CPU."""
import os
import re

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from denseclip import get_denseclip_cfg
from denseclip.data.datasets.shapes import generate_shapes_dataset

from helpers import REPO, TINY_SHAPES_CONFIGS


def readme_python_block(section: str) -> str:
    """The first fenced ```python block under the README heading ``section``."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    start = text.index(f"\n## {section}\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match and text.find("\n## ", start + 1) > match.start(), f"no python block under '## {section}'"
    return match.group(1)


def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    """What `make quickstart` leaves (configs/, output/quickstart/model_final.pth, datasets/shapes/val/) is
    rebuilt in a folder with random weights and the snippet is run there unchanged."""
    os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
    config = TINY_SHAPES_CONFIGS["mask_rcnn"]
    model = build_model(get_denseclip_cfg(os.path.join(REPO, config), ["MODEL.DEVICE", "cpu"]))
    os.makedirs(tmp_path / "output" / "quickstart")
    DetectionCheckpointer(model, save_dir=str(tmp_path / "output" / "quickstart")).save("model_final")
    generate_shapes_dataset(str(tmp_path / "datasets" / "shapes"), num_train=0, num_val=2)
    code = readme_python_block("Inference in Python")
    assert config in code and "model_final.pth" in code
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    outputs, predictor = scope["outputs"], scope["predictor"]
    assert predictor.score_map_names == ["circle", "red ring", "moon"]  # the snippet's vocabulary
    assert outputs["score_maps"].shape == (3, 128, 128)  # one map per name, on the 128 x 128 image
    assert outputs["instances"].image_size == (128, 128)
    other = scope["other"]  # a call with its own vocabulary, after which the predictor's own is unchanged
    assert other["score_map_names"] == ["star", "sun"] and other["score_maps"].shape == (2, 128, 128)
    assert predictor.score_map_names == ["circle", "red ring", "moon"]
    # the weights are the file's, not a fresh initialisation
    loaded = predictor.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    printed = capsys.readouterr().out
    assert "num_instances=" in printed and "['circle', 'red ring', 'moon'] torch.Size([3, 128, 128])" in printed
