"""Unusual but valid input: huge and tiny images, images without objects, classes absent from val."""
import json

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from denseclip.engine import DenseCLIPTrainer

from helpers import data_cfg, tiny_detector_cfg, training_batch, write_coco_dataset


def test_image_larger_than_the_positional_grid():
    cfg = tiny_detector_cfg("mask_rcnn")
    cfg.MODEL.CLIP.INPUT_RESOLUTION = 1344  # the release's 42 x 42 grid
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 1440, 1600
    model = build_model(cfg).eval()
    image = torch.rand(3, 1440, 1600) * 255
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 1440, "width": 1600}])
        _, score_map = model.backbone.forward_with_score_map(model.preprocess_image([{"image": image}]).tensor)
    assert score_map.shape[-2:] == (45, 50) and torch.isfinite(score_map).all()
    assert output["instances"].image_size == (1440, 1600)


def test_very_small_images_train_and_infer():
    model = build_model(tiny_detector_cfg("mask_rcnn"))
    batch = training_batch(with_masks=True)
    for item in batch:
        item["image"] = item["image"][:, :20, :24]
        inst = item["instances"]
        inst._image_size = (20, 24)
        inst.gt_boxes.clip((20, 24))
        inst.gt_masks.tensor = inst.gt_masks.tensor[:, :20, :24]
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": torch.rand(3, 12, 16) * 255, "height": 12, "width": 16}])
    assert output["instances"].image_size == (12, 16)


@pytest.mark.slow
def test_images_without_objects_train_and_evaluate(tmp_path):
    json_file, image_dir = write_coco_dataset(str(tmp_path), num_images=6)
    with open(json_file) as f:
        coco = json.load(f)
    # Images 1-2 lose their objects; "cup" (id 30) gets no ground truth at all.
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] > 2 and a["category_id"] != 30]
    with open(json_file, "w") as f:
        json.dump(coco, f)
    output_dir = str(tmp_path / "output")
    cfg = data_cfg(json_file, image_dir, output_dir, iterations=6, extra=["DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False"])
    cfg.DATASETS.TEST = ("coco_format_test",)
    cfg.SOLVER.IMS_PER_BATCH = 6  # every batch holds the object-less images
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # a barely trained model still yields detections
    trainer = DenseCLIPTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 6 and np.isfinite(losses).all()
    assert set(results) == {"bbox", "segm", "score_maps"}  # the shapes config measures score maps too
    assert np.isnan(results["bbox"]["AP-cup"]) and np.isfinite(results["bbox"]["AP"])
