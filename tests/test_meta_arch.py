import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from denseclip.modeling import SCORE_MAP_KEY, DenseCLIPRCNN, DenseCLIPRetinaNet

from helpers import tiny_detector_cfg


def training_batch(with_masks=False):
    torch.manual_seed(0)
    batch = []
    for boxes, classes in (([[4, 6, 40, 50], [30, 10, 60, 30]], [0, 2]), ([], [])):
        inst = Instances((64, 64))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
        if with_masks:
            masks = torch.zeros(len(boxes), 64, 64, dtype=torch.bool)
            for i, (x1, y1, x2, y2) in enumerate(boxes):
                masks[i, y1:y2, x1:x2] = True
            inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.rand(3, 64, 64) * 255, "instances": inst})
    return batch


def build(kind, **overrides):
    cfg = tiny_detector_cfg(kind)
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = getattr(node, part)
        setattr(node, last, value)
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("kind, cls", [("retinanet", DenseCLIPRetinaNet), ("mask_rcnn", DenseCLIPRCNN)])
def test_training_losses_include_score_map_loss(kind, cls):
    model = build(kind)
    assert isinstance(model, cls)
    with EventStorage():
        losses = model(training_batch(with_masks=kind == "mask_rcnn"))
    assert "loss_score_map" in losses and len(losses) > 1
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.bottom_up.score_map.text_encoder.contexts.grad.abs().sum() > 0
    assert model.backbone.bottom_up.score_map.gamma.grad is not None


def test_res5_carries_the_score_map():
    model = build("retinanet").eval()
    bottom_up = model.backbone.bottom_up
    assert bottom_up.output_shape()["res5"].channels == 256 + 3
    with torch.no_grad():
        features = bottom_up(torch.randn(1, 3, 64, 96))
    assert features["res5"].shape == (1, 259, 2, 3)
    torch.testing.assert_close(features["res5"][:, 256:], features[SCORE_MAP_KEY])
    # P6 of RetinaNet is computed from the concatenated res5.
    assert model.backbone.top_block.p6.in_channels == 259


@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn"])
def test_cached_text_embeddings_give_identical_outputs(kind):
    cached, recomputed = build(kind).eval(), build(kind, **{"MODEL.DENSECLIP.CACHE_TEXT_EMBEDDINGS": False}).eval()
    recomputed.load_state_dict(cached.state_dict())
    runs = []
    cached.backbone.bottom_up.score_map.text_encoder.token_embedding.register_forward_hook(lambda *a: runs.append(1))
    images = [{"image": torch.rand(3, 64, 64) * 255} for _ in range(3)]
    with torch.no_grad():
        for image in images:
            with_cache = cached.backbone(cached.preprocess_image([image]).tensor)
            without = recomputed.backbone(recomputed.preprocess_image([image]).tensor)
            torch.testing.assert_close(with_cache[SCORE_MAP_KEY], without[SCORE_MAP_KEY], rtol=0, atol=0)
            a, b = cached([image])[0]["instances"], recomputed([image])[0]["instances"]
            torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
            torch.testing.assert_close(a.scores, b.scores)
    assert len(runs) == 1


def test_class_count_mismatch_is_a_clear_error():
    cfg = tiny_detector_cfg("retinanet")
    cfg.MODEL.RETINANET.NUM_CLASSES = 80
    with pytest.raises(ValueError, match=r"3 classes .* has 80 .*MODEL.RETINANET.NUM_CLASSES"):
        build_model(cfg)


def test_denseclip_meta_arch_needs_language_guided_backbone():
    cfg = tiny_detector_cfg("mask_rcnn")
    cfg.MODEL.DENSECLIP.ENABLED = False
    with pytest.raises(ValueError, match="MODEL.DENSECLIP.ENABLED True"):
        build_model(cfg)
