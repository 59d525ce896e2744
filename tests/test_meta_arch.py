import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from denseclip.modeling import DenseCLIPRCNN, DenseCLIPRetinaNet

from helpers import fill_deterministically, tiny_detector_cfg, training_batch

# Losses of the tiny detectors on training_batch() with fill_deterministically() weights, no dropout and
# torch.manual_seed(0) before the forward, recorded before the score map's path became explicit
# (backbone forward hooks then): the explicit forward computes the same function.
RECORDED_LOSSES = {
    "retinanet": {"loss_cls": 6.3793230056762695, "loss_box_reg": 0.2782059609889984,
                  "loss_score_map": 1.5921915769577026},
    "mask_rcnn": {"loss_cls": 1.1772459745407104, "loss_box_reg": 0.31180906295776367,
                  "loss_mask": 0.6036922931671143, "loss_rpn_cls": 0.8971275091171265,
                  "loss_rpn_loc": 0.014592094346880913, "loss_score_map": 1.5921915769577026},
}


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


@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn"])
def test_training_losses_as_recorded(kind):
    model = fill_deterministically(build(kind, **{"MODEL.DENSECLIP.CONTEXT_DECODER.DROPOUT": 0.0}))
    torch.manual_seed(0)
    with EventStorage():
        losses = model(training_batch(with_masks=kind == "mask_rcnn"))
    assert {k: v.item() for k, v in losses.items()} == pytest.approx(RECORDED_LOSSES[kind], rel=1e-5)


@pytest.mark.parametrize("kind, cls", [("retinanet", DenseCLIPRetinaNet), ("mask_rcnn", DenseCLIPRCNN)])
def test_training_losses_include_score_map_loss(kind, cls):
    model = build(kind)
    assert isinstance(model, cls)
    with EventStorage():
        losses = model(training_batch(with_masks=kind == "mask_rcnn"))
    assert "loss_score_map" in losses and len(losses) > 1
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.score_map.text_encoder.contexts.grad.abs().sum() > 0
    assert model.backbone.score_map.gamma.grad.abs().sum() > 0


def test_res5_carries_the_score_map_into_the_fpn():
    model = build("retinanet").eval()
    backbone = model.backbone
    assert backbone.neck.bottom_up.output_shape()["res5"].channels == 256 + 3
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features, score_map, *_ = backbone.forward_with_score_map(image)
        res5 = backbone.bottom_up(image)["res5"]
        res5_with_scores = torch.cat([res5, score_map], dim=1)
        lateral = backbone.neck.fpn_lateral5(res5_with_scores)
    assert score_map.shape == (1, 3, 2, 3)
    torch.testing.assert_close(features["p5"], backbone.neck.fpn_output5(lateral))
    torch.testing.assert_close(features["p6"], backbone.neck.top_block.p6(res5_with_scores))


@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn"])
def test_score_maps_returned_on_the_original_image(kind):
    """Off by default; when asked, each image's score maps come back at its original size, equal to the
    backbone's score map upsampled to the padded input and resized like Detectron2's semantic outputs."""
    plain = build(kind).eval()
    model = build(kind, **{"MODEL.DENSECLIP.RETURN_SCORE_MAPS": True}).eval()
    model.load_state_dict(plain.state_dict())
    image = torch.rand(3, 60, 90) * 255  # resized from a 50 x 75 original, padded to 64 x 96
    inputs = [{"image": image, "height": 50, "width": 75}]
    with torch.no_grad():
        (plain,) = plain(inputs)
        (output,) = model(inputs)
        _, score_map, *_ = model.backbone.forward_with_score_map(model.preprocess_image(inputs).tensor)
    assert "score_maps" not in plain
    assert output["score_maps"].shape == (3, 50, 75)
    padded = F.interpolate(score_map, size=(64, 96), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(output["score_maps"], sem_seg_postprocess(padded, (60, 90), 50, 75))
    torch.testing.assert_close(output["instances"].pred_boxes.tensor, plain["instances"].pred_boxes.tensor)


def test_score_maps_for_any_vocabulary():
    """An input's "vocabulary" (names, a comma-separated string, or a Vocabulary made by the score-map
    module) gives that input's score maps; the text side runs once per vocabulary (cached)."""
    model = build("mask_rcnn").eval()
    image = torch.rand(3, 64, 64) * 255
    runs = []
    model.score_map.text_encoder.token_embedding.register_forward_hook(lambda *a: runs.append(1))
    words = model.score_map.vocabulary("zebra, traffic cone,dog, teapot")
    assert words.names == ("zebra", "traffic cone", "dog", "teapot") and words.token_ids.shape == (4, 5)
    with torch.no_grad():
        (own,) = model([{"image": image, "vocabulary": None}])
        (first,) = model([{"image": image, "vocabulary": words}])
        (second,) = model([{"image": image, "vocabulary": ["zebra", "traffic cone", "dog", "teapot"]}])
    assert "score_maps" not in own  # RETURN_SCORE_MAPS is off and no vocabulary was given
    assert first["score_maps"].shape == (4, 64, 64)
    torch.testing.assert_close(first["score_maps"], second["score_maps"])
    torch.testing.assert_close(first["instances"].scores, own["instances"].scores)  # the head keeps its classes
    assert len(runs) == 2  # training classes once, the vocabulary once: both cached
    assert model.score_map.vocabulary(["zebra", "traffic cone", "dog", "teapot"]) is words  # tokenized once
    # The training classes in another order: the same maps, reordered (the context decoder's attention
    # over the names has no positions).
    with torch.no_grad():
        (classes,) = model([{"image": image, "vocabulary": ["cat", "dog", "traffic light"]}])
        (reordered,) = model([{"image": image, "vocabulary": ["traffic light", "cat", "dog"]}])
    torch.testing.assert_close(reordered["score_maps"], classes["score_maps"][[2, 0, 1]])


def test_each_input_of_a_batch_gets_its_own_vocabulary():
    """A batch mixing vocabularies (and inputs without one) returns each input what it alone would get."""
    model = build("retinanet", **{"MODEL.DENSECLIP.RETURN_SCORE_MAPS": True}).eval()
    images = [torch.rand(3, 64, 64) * 255 for _ in range(3)]
    vocabularies = ["moon, sun", None, "teapot"]
    with torch.no_grad():
        batch = model([{"image": im, "vocabulary": v} for im, v in zip(images, vocabularies)])
        alone = [model([{"image": im, "vocabulary": v}])[0] for im, v in zip(images, vocabularies)]
    assert [out["score_maps"].shape[0] for out in batch] == [2, 3, 1]
    for together, single in zip(batch, alone):
        torch.testing.assert_close(together["score_maps"], single["score_maps"], rtol=1e-4, atol=1e-5)


def test_a_name_that_does_not_fit_the_prompt_is_refused_when_the_vocabulary_is_made():
    model = build("retinanet").eval()
    with pytest.raises(ValueError, match="'a rather long class name for a prompt'"):
        model.score_map.vocabulary(["cat", "a rather long class name for a prompt"])


@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn"])
def test_cached_text_embeddings_give_identical_outputs(kind):
    on = {"MODEL.DENSECLIP.RETURN_SCORE_MAPS": True}
    cached = build(kind, **on).eval()
    recomputed = build(kind, **on, **{"MODEL.DENSECLIP.CACHE_TEXT_EMBEDDINGS": False}).eval()
    recomputed.load_state_dict(cached.state_dict())
    runs = []
    cached.score_map.text_encoder.token_embedding.register_forward_hook(lambda *a: runs.append(1))
    with torch.no_grad():
        for _ in range(3):
            image = {"image": torch.rand(3, 64, 64) * 255}
            (a,), (b,) = cached([image]), recomputed([image])
            torch.testing.assert_close(a["score_maps"], b["score_maps"], rtol=0, atol=0)
            torch.testing.assert_close(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
            torch.testing.assert_close(a["instances"].scores, b["instances"].scores)
    assert len(runs) == 1


def test_class_count_mismatch_is_a_clear_error():
    cfg = tiny_detector_cfg("retinanet")
    cfg.MODEL.RETINANET.NUM_CLASSES = 80
    with pytest.raises(ValueError, match=r"3 classes .* has 80 \(MODEL.RETINANET.NUM_CLASSES\)"):
        build_model(cfg)


def test_one_switch_misconfigurations_fail_at_build_time():
    # A DenseCLIP meta-architecture on a backbone that makes no score maps.
    cfg = tiny_detector_cfg("mask_rcnn")
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 18, 64
    cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES
    with pytest.raises(ValueError, match=r"MODEL.META_ARCHITECTURE DenseCLIPRCNN .* MODEL.BACKBONE.NAME"):
        build_model(cfg)
    # The stock meta-architecture on the same config builds the CLIP baseline: no text, no score map.
    cfg = tiny_detector_cfg("mask_rcnn")
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    model = build_model(cfg)
    assert not cfg.MODEL.DENSECLIP.LANGUAGE_GUIDED  # set only in the copy a DenseCLIP meta-architecture builds with
    assert not any("text_encoder" in name for name, _ in model.named_parameters())
    assert model.backbone.bottom_up.attnpool is None
    assert model.backbone.bottom_up.output_shape()["res5"].channels == 256


@pytest.mark.parametrize("clip_first, kept", [(True, [[0.0, 0.0, 40.0, 40.0]]), (False, [[-60.0, 0.0, 40.0, 40.0], [0.0, 0.0, 40.0, 40.0]])])
def test_retinanet_clips_boxes_before_nms(clip_first, kept):
    """MODEL.RETINANET.CLIP_BOXES_BEFORE_NMS (on, as MMDetection): a box reaching 60 px left of the image
    overlaps [0, 0, 40, 40] with IoU 1600 / 4000 = 0.4 unclipped (both kept by NMS at 0.5), 1.0 clipped
    (only the higher-scoring one is kept, clipped)."""
    model = build("retinanet", **{"MODEL.RETINANET.CLIP_BOXES_BEFORE_NMS": clip_first}).eval()
    anchors = [Boxes(torch.tensor([[-60.0, 0.0, 40.0, 40.0], [0.0, 0.0, 40.0, 40.0]]))]
    scores = [torch.tensor([[0.9, 0.0, 0.0], [0.8, 0.0, 0.0]])]  # class 0; probabilities
    deltas = [torch.zeros(2, 4)]  # the boxes are the anchors
    result = model.inference_single_image(anchors, scores, deltas, (100, 100))
    assert result.pred_boxes.tensor.tolist() == kept
    assert result.scores.tolist() == pytest.approx([0.9, 0.8][: len(kept)])
