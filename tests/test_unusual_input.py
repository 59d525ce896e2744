"""Unusual but valid input: huge and tiny images, images without objects, classes absent from val."""
import json

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from denseclip.engine import DenseCLIPTrainer

from helpers import bilinear_grid, data_cfg, direct_attention_pool, tiny_detector_cfg, training_batch, write_coco_dataset


def test_image_larger_than_the_positional_grid():
    """A 1440 x 1600 image (45 x 50 at stride 32) on the release's 42 x 42 grid: the score map is the one
    of the attention pool with the grid resized bilinearly (F.interpolate) to 45 x 50."""
    cfg = tiny_detector_cfg("mask_rcnn")
    cfg.MODEL.CLIP.INPUT_RESOLUTION = 1344  # the release's 42 x 42 grid
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 1440, 1600
    model = build_model(cfg).eval()
    image = torch.rand(3, 1440, 1600) * 255
    images = model.preprocess_image([{"image": image}]).tensor
    pool = model.backbone.bottom_up.attnpool
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 1440, "width": 1600}])
        _, score_map, *_ = model.backbone.forward_with_score_map(images)
        res5 = model.backbone.bottom_up(images)["res5"]
        positions = torch.cat([pool.positional_embedding[:1], bilinear_grid(pool.positional_embedding, 42, 45, 50)])
        expected = model.backbone.score_map(*direct_attention_pool(pool, res5, positions))
    assert score_map.shape[-2:] == (45, 50)
    torch.testing.assert_close(score_map, expected, rtol=1e-4, atol=1e-4)
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
    assert losses["loss_score_map"] > 0  # the clipped boxes still cover cells of the 8 x 8 grid
    model.eval()
    model.roi_heads.box_predictor.test_score_thresh = 0.0
    with torch.no_grad():
        (output,) = model([{"image": torch.rand(3, 12, 16) * 255, "height": 12, "width": 16}])
    instances = output["instances"]
    assert instances.image_size == (12, 16) and len(instances) > 0
    boxes = instances.pred_boxes.tensor
    assert (boxes >= 0).all() and (boxes[:, 0::2] <= 16).all() and (boxes[:, 1::2] <= 12).all()
    assert instances.pred_masks.shape == (len(instances), 12, 16)


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
