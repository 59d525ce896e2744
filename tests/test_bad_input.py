"""Bad input gets a clear error naming the problem and the fix, and nothing already written is lost."""
import json
import os

import pytest
import torch

from detectron2.engine import HookBase

from denseclip.data import DenseCLIPDatasetMapper
from denseclip.engine import DenseCLIPTrainer

from helpers import TINY_SHAPES_CONFIGS, dataset_opts, data_cfg, run_script, tiny_opts, write_coco_dataset

CONFIG = TINY_SHAPES_CONFIGS["mask_rcnn"]


@pytest.mark.slow
def test_missing_clip_weights_through_train_net(tmp_path):
    json_file, image_dir = write_coco_dataset(str(tmp_path / "data"))
    output_dir = tmp_path / "output"
    output_dir.mkdir()
    (output_dir / "model_0000999.pth").write_bytes(b"an earlier run's checkpoint")
    missing = str(tmp_path / "pretrained" / "RN50.pt")
    result = run_script([
        "train_net.py", "--config-file", CONFIG, *dataset_opts(json_file, image_dir),
        *tiny_opts("mask_rcnn", str(output_dir), 5), "MODEL.WEIGHTS", missing,
    ])
    assert result.returncode != 0
    assert f"MODEL.WEIGHTS file not found: {missing}" in result.stdout
    assert (output_dir / "model_0000999.pth").read_bytes() == b"an earlier run's checkpoint"


def test_missing_and_corrupt_images_are_named(tmp_path):
    json_file, image_dir = write_coco_dataset(str(tmp_path))
    mapper = DenseCLIPDatasetMapper(data_cfg(json_file, image_dir), is_train=True)
    (tmp_path / "images" / "0.png").write_bytes(b"not a png")
    os.remove(tmp_path / "images" / "1.png")
    for name in ("0.png", "1.png"):
        path = str(tmp_path / "images" / name)
        record = {"file_name": path, "image_id": 7, "height": 96, "width": 96, "annotations": []}
        with pytest.raises(OSError, match=rf"Cannot read image {path} \(image_id 7\).*remove its entry"):
            mapper(record)


def test_dataset_without_usable_images(tmp_path):
    json_file, image_dir = write_coco_dataset(str(tmp_path))
    with open(json_file) as f:
        coco = json.load(f)
    for variant, content in (("no_annotations", {**coco, "annotations": []}), ("no_images", {**coco, "images": [], "annotations": []})):
        path = str(tmp_path / f"{variant}.json")
        with open(path, "w") as f:
            json.dump(content, f)
        with pytest.raises(ValueError, match=r"has no usable images.*Check the annotation file"):
            DenseCLIPTrainer.build_train_loader(data_cfg(path, image_dir))


class _DivergeAt(HookBase):
    """Makes the model produce non-finite losses from ``iteration`` on, as a divergence would."""

    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            with torch.no_grad():
                self.trainer.model.backbone.neck.fpn_output5.weight.fill_(float("inf"))


@pytest.mark.slow
def test_nan_loss_stops_at_once_and_keeps_last_good_checkpoint(tmp_path):
    json_file, image_dir = write_coco_dataset(str(tmp_path / "data"))
    output_dir = str(tmp_path / "output")
    cfg = data_cfg(json_file, image_dir, output_dir, iterations=30, extra=["SOLVER.CHECKPOINT_PERIOD", "5"])
    trainer = DenseCLIPTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([_DivergeAt(7)])
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    message = str(error.value)
    good = os.path.join(output_dir, "model_0000004.pth")
    assert "stopped at iteration 7" in message and f"Last good checkpoint: {good}" in message and "--resume" in message
    assert not os.path.exists(os.path.join(output_dir, "model_final.pth"))
    saved = torch.load(good, map_location="cpu", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
