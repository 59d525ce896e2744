"""
Converting the DenseCLIP release's MMDetection checkpoints: checkpoints of the release's layout are
written here from its module names and shapes, and the converted models are checked against the
MMDetection conventions (anchor order, box decoding, RoI level mapping) computed on the release's
own tensors.
"""
import math
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision

from detectron2.modeling import build_model
from detectron2.structures import Boxes

from denseclip import DenseCLIPCheckpointer, get_denseclip_cfg
from denseclip.checkpoint import convert_release_state_dict, read_release_checkpoint
from denseclip.data import resolve_class_names

from helpers import REPO, run_script, tiny_detector_cfg

CLASSES = ["cat", "dog", "traffic light"]


# ------------------------------------------------------------------ the release's layout, written down


def release_state_dict(cfg, detector: str, guided: bool, num_classes: int = len(CLASSES), seed: int = 0) -> dict:
    """
    A state dict named and shaped as the release's MMDetection modules for ``cfg``'s sizes: backbone.*
    (CLIP's visual.* names: the release's CLIPResNet), text_encoder.* (CLIP's text names), contexts
    (1 x M x W), gamma, context_decoder.*, neck.{lateral,fpn}_convs.{i}.conv, and bbox_head.* or
    rpn_head.* and roi_head.*; random values.
    """
    torch.manual_seed(seed)
    clip, dc, k = cfg.MODEL.CLIP, cfg.MODEL.DENSECLIP, num_classes
    visual = open_clip.modified_resnet.ModifiedResNet(
        list(clip.LAYERS), clip.EMBED_DIM, clip.WIDTH * 32 // 64, clip.INPUT_RESOLUTION, clip.WIDTH
    )
    state = {f"backbone.{n}": v for n, v in visual.state_dict().items() if guided or not n.startswith("attnpool.")}
    for name, value in state.items():
        if name.endswith("running_var"):
            value.uniform_(0.5, 1.5)
        elif value.is_floating_point() and not name.endswith("num_batches_tracked"):
            value.normal_(0, 0.05)
    if guided:
        text = open_clip.transformer.TextTransformer(
            context_length=dc.PROMPT_LENGTH + dc.NUM_CONTEXT, width=clip.TEXT.WIDTH, heads=clip.TEXT.HEADS,
            layers=clip.TEXT.LAYERS, output_dim=clip.EMBED_DIM,
        )
        state.update({f"text_encoder.{n}": v for n, v in text.state_dict().items()})
        state["contexts"] = torch.randn(1, dc.NUM_CONTEXT, clip.TEXT.WIDTH)
        state["gamma"] = torch.rand(clip.EMBED_DIM)
        d, w = clip.EMBED_DIM, dc.CONTEXT_DECODER.WIDTH
        shapes = {"memory_proj.0": [d], "memory_proj.1": [w, d], "memory_proj.2": [w], "text_proj.0": [d],
                  "text_proj.1": [w, d], "out_proj.0": [w], "out_proj.1": [d, w]}
        for i in range(dc.CONTEXT_DECODER.LAYERS):
            for attn in ("self_attn", "cross_attn"):
                shapes.update({f"decoder.{i}.{attn}.{p}_proj": [w, w] for p in "qkv"})
                shapes[f"decoder.{i}.{attn}.proj"] = [w, w]
            shapes.update({f"decoder.{i}.norm{j}": [w] for j in (1, 2, 3)})
            shapes.update({f"decoder.{i}.mlp.0": [4 * w, w], f"decoder.{i}.mlp.3": [w, 4 * w]})
        for name, shape in shapes.items():
            state[f"context_decoder.{name}.weight"] = torch.randn(shape) * 0.05
            if not name.endswith(("q_proj", "k_proj", "v_proj")):
                state[f"context_decoder.{name}.bias"] = torch.randn(shape[0]) * 0.05

    def conv(name, out_channels, in_channels, size, transposed=False):
        shape = [in_channels, out_channels] if transposed else [out_channels, in_channels]
        state[f"{name}.weight"] = torch.randn(*shape, size, size) / math.sqrt(in_channels * size * size)
        state[f"{name}.bias"] = torch.randn(out_channels) * 0.1

    out = cfg.MODEL.FPN.OUT_CHANNELS
    stages = [int(f[-1]) for f in cfg.MODEL.FPN.IN_FEATURES]
    channels = [clip.WIDTH * 4 * 2 ** (s - 2) for s in stages]
    channels[-1] += k if guided else 0
    for i, c in enumerate(channels):
        conv(f"neck.lateral_convs.{i}.conv", out, c, 1)
        conv(f"neck.fpn_convs.{i}.conv", out, out, 3)
    if detector == "retinanet":
        anchors = len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]) * len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])
        conv(f"neck.fpn_convs.{len(channels)}.conv", out, channels[-1], 3)  # P6 on the input res5 (+ scores)
        conv(f"neck.fpn_convs.{len(channels) + 1}.conv", out, out, 3)  # P7
        for j in range(cfg.MODEL.RETINANET.NUM_CONVS):
            conv(f"bbox_head.cls_convs.{j}.conv", out, out, 3)
            conv(f"bbox_head.reg_convs.{j}.conv", out, out, 3)
        conv("bbox_head.retina_cls", anchors * k, out, 3)
        conv("bbox_head.retina_reg", anchors * 4, out, 3)
    else:
        anchors = len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])
        conv("rpn_head.rpn_conv", out, out, 3)
        conv("rpn_head.rpn_cls", anchors, out, 1)
        conv("rpn_head.rpn_reg", anchors * 4, out, 1)
        fc, pooled = cfg.MODEL.ROI_BOX_HEAD.FC_DIM, cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        state["roi_head.bbox_head.shared_fcs.0.weight"] = torch.randn(fc, out * pooled * pooled) * 0.02
        state["roi_head.bbox_head.shared_fcs.0.bias"] = torch.randn(fc) * 0.1
        state["roi_head.bbox_head.shared_fcs.1.weight"] = torch.randn(fc, fc) * 0.1
        state["roi_head.bbox_head.shared_fcs.1.bias"] = torch.randn(fc) * 0.1
        for name, rows in (("fc_cls", k + 1), ("fc_reg", 4 * k)):
            state[f"roi_head.bbox_head.{name}.weight"] = torch.randn(rows, fc) * 0.1
            state[f"roi_head.bbox_head.{name}.bias"] = torch.randn(rows) * 0.1
        dim = cfg.MODEL.ROI_MASK_HEAD.CONV_DIM
        for j in range(cfg.MODEL.ROI_MASK_HEAD.NUM_CONV):
            conv(f"roi_head.mask_head.convs.{j}.conv", dim, out if j == 0 else dim, 3)
        conv("roi_head.mask_head.upsample", dim, dim, 2, transposed=True)
        conv("roi_head.mask_head.conv_logits", k, dim, 1)
    return state


def mmdet_anchors(stride: int, sizes, ratios, height: int, width: int) -> torch.Tensor:
    """MMDetection 2.x's anchors of a level, in its order: location-major (y, then x), then ratio-major
    (ratio * sizes + size); centred on (x * stride, y * stride) (center_offset 0); h / w = ratio."""
    h_ratios = torch.tensor(ratios, dtype=torch.float64).sqrt()
    w_ratios = 1 / h_ratios
    sizes = torch.tensor(sizes, dtype=torch.float64)
    ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    base = torch.stack([-ws / 2, -hs / 2, ws / 2, hs / 2], dim=1)
    ys, xs = torch.meshgrid(torch.arange(height) * stride, torch.arange(width) * stride, indexing="ij")
    shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4).double()
    return (shifts + base[None]).reshape(-1, 4).float()


def mmdet_decode(anchors: torch.Tensor, deltas: torch.Tensor, stds=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """MMDetection 2.x's delta2bbox (means 0): widths x2 - x1, dw and dh clamped to +-log(1000 / 16)."""
    deltas = deltas * torch.tensor(stds)
    dx, dy, dw, dh = deltas.unbind(1)
    limit = abs(math.log(16 / 1000))
    dw, dh = dw.clamp(-limit, limit), dh.clamp(-limit, limit)
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    px, py = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    gx, gy, gw, gh = px + pw * dx, py + ph * dy, pw * dw.exp(), ph * dh.exp()
    return torch.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], dim=1)


def mmdet_head_outputs(x: torch.Tensor, convs, last: str, state: dict) -> torch.Tensor:
    """A release head on one feature map: 3 x 3 convs with ReLU, then the predictor ``last`` (3 x 3 or
    1 x 1); its output flattened as MMDetection does: (H * W * A, C / A)."""
    for name in convs:
        x = F.relu(F.conv2d(x, state[f"{name}.weight"], state[f"{name}.bias"], padding=1))
    weight = state[f"{last}.weight"]
    return F.conv2d(x, weight, state[f"{last}.bias"], padding=weight.shape[-1] // 2)[0].permute(1, 2, 0)


def same_anchor_index(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """For each of our anchors, the index of the geometrically identical MMDetection anchor."""
    distance = torch.cdist(ours.double(), theirs.double())
    index = distance.argmin(dim=1)
    assert distance.gather(1, index[:, None]).max() < 1e-3 and len(set(index.tolist())) == len(ours)
    return index


def convert(cfg, state, classes=CLASSES):
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    converted, report = convert_release_state_dict(state, {"CLASSES": list(classes)}, model, cfg, resolve_class_names(cfg))
    return model, converted, report


def tiny(detector):
    cfg = tiny_detector_cfg(detector, class_names=CLASSES)
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.LAYERS = 2
    return cfg


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
@pytest.mark.parametrize("guided", [True, False], ids=["denseclip", "clip"])
def test_every_tensor_mapped_and_loading_is_exact(detector, guided, tmp_path):
    cfg = tiny(detector)
    if not guided:
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet" if detector == "retinanet" else "GeneralizedRCNN"
    state = release_state_dict(cfg, detector, guided)
    model, converted, report = convert(cfg, state)
    assert report.mapped == len(state) == len(converted) == len(model.state_dict())
    path = str(tmp_path / "converted.pth")
    torch.save({"model": converted}, path)
    DenseCLIPCheckpointer(model).load(path)
    loaded = model.state_dict()
    assert loaded.keys() == converted.keys()
    assert all(torch.equal(loaded[k], v) for k, v in converted.items())
    # Unreordered tensors are the release's, renamed.
    assert torch.equal(loaded["backbone.bottom_up.layer1.0.conv1.weight"], state["backbone.layer1.0.conv1.weight"])
    fpn = "backbone.neck." if guided else "backbone."
    assert torch.equal(loaded[fpn + "fpn_lateral5.weight"], state[f"neck.lateral_convs.{2 if detector == 'retinanet' else 3}.conv.weight"])
    if guided:
        assert torch.equal(loaded["backbone.score_map.text_encoder.contexts"], state["contexts"][0])
        assert torch.equal(
            loaded["backbone.score_map.context_decoder.layers.1.cross_attn.out_proj.weight"],
            state["context_decoder.decoder.1.cross_attn.proj.weight"],
        )


def test_retinanet_boxes_and_scores_of_every_anchor_follow_mmdetection():
    cfg = tiny("retinanet")
    state = release_state_dict(cfg, "retinanet", guided=True)
    model, converted, _ = convert(cfg, state)
    model.load_state_dict(converted)
    image = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        features = [model.backbone(image)[f] for f in model.head_in_features]
        logits, deltas = model.head(features)
        anchors = model.anchor_generator(features)
    sizes, ratios = cfg.MODEL.ANCHOR_GENERATOR.SIZES, cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0]
    convs = [f"bbox_head.cls_convs.{j}.conv" for j in range(cfg.MODEL.RETINANET.NUM_CONVS)]
    reg_convs = [c.replace("cls_convs", "reg_convs") for c in convs]
    for level, feature in enumerate(features):
        stride = 2 ** (level + 3)
        with torch.no_grad():
            mm_scores = mmdet_head_outputs(feature, convs, "bbox_head.retina_cls", state).reshape(-1, len(CLASSES))
            mm_deltas = mmdet_head_outputs(feature, reg_convs, "bbox_head.retina_reg", state).reshape(-1, 4)
        mm_anchors = mmdet_anchors(stride, sizes[level], ratios, *feature.shape[-2:])
        index = same_anchor_index(anchors[level].tensor, mm_anchors)
        ours_scores = logits[level][0].permute(1, 2, 0).reshape(-1, len(CLASSES)).sigmoid()
        ours_boxes = model.box2box_transform.apply_deltas(
            deltas[level][0].permute(1, 2, 0).reshape(-1, 4), anchors[level].tensor
        )
        torch.testing.assert_close(ours_scores, mm_scores[index].sigmoid(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_boxes, mmdet_decode(mm_anchors, mm_deltas)[index], rtol=1e-5, atol=1e-4)


def mmdet_roi_features(features, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """MMDetection's SingleRoIExtractor: level floor(log2(sqrt(w h) / 56 + 1e-6)) clamped to 0..3 of
    P2..P5, RoIAlign (aligned, adaptive sampling)."""
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    levels = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()
    out = torch.zeros(len(boxes), features[0].shape[1], size, size)
    for level, feature in enumerate(features[:4]):
        chosen = (levels == level).nonzero()[:, 0]
        if len(chosen):
            rois = torch.cat([torch.zeros(len(chosen), 1), boxes[chosen]], dim=1)
            out[chosen] = torchvision.ops.roi_align(feature, rois, size, 1 / 2 ** (level + 2), 0, aligned=True)
    return out


def test_mask_rcnn_proposals_and_heads_follow_mmdetection():
    cfg = tiny("mask_rcnn")
    state = release_state_dict(cfg, "mask_rcnn", guided=True)
    model, converted, _ = convert(cfg, state)
    model.load_state_dict(converted)
    image = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        features = model.backbone(image)
        rpn_features = [features[f] for f in model.proposal_generator.in_features]
        objectness, rpn_deltas = model.proposal_generator.rpn_head(rpn_features)
        anchors = model.proposal_generator.anchor_generator(rpn_features)
    ratios = cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0]
    for level, feature in enumerate(rpn_features):
        with torch.no_grad():
            mm_scores = mmdet_head_outputs(feature, ["rpn_head.rpn_conv"], "rpn_head.rpn_cls", state).reshape(-1)
            mm_deltas = mmdet_head_outputs(feature, ["rpn_head.rpn_conv"], "rpn_head.rpn_reg", state).reshape(-1, 4)
        mm_anchors = mmdet_anchors(2 ** (level + 2), cfg.MODEL.ANCHOR_GENERATOR.SIZES[level], ratios, *feature.shape[-2:])
        index = same_anchor_index(anchors[level].tensor, mm_anchors)
        torch.testing.assert_close(objectness[level][0].permute(1, 2, 0).reshape(-1), mm_scores[index], rtol=1e-5, atol=1e-5)
        ours = model.proposal_generator.box2box_transform.apply_deltas(
            rpn_deltas[level][0].permute(1, 2, 0).reshape(-1, 4), anchors[level].tensor
        )
        torch.testing.assert_close(ours, mmdet_decode(mm_anchors, mm_deltas)[index], rtol=1e-5, atol=1e-4)

    # Box and mask heads on fixed RoIs of every FPN level.
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(40, 2, generator=generator) * 100
    boxes = torch.cat([corner, corner + 8 + torch.rand(40, 2, generator=generator) * 150], dim=1).clamp(max=159)
    p2_p5 = [features[f] for f in ("p2", "p3", "p4", "p5")]
    heads = model.roi_heads
    with torch.no_grad():
        cls_logits, box_deltas = heads.box_predictor(heads.box_head(heads.box_pooler(p2_p5, [Boxes(boxes)])))
        mask_logits = heads.mask_head.layers(heads.mask_pooler(p2_p5, [Boxes(boxes)]))
        x = mmdet_roi_features(p2_p5, boxes, 7).flatten(1)
        for j in range(2):
            x = F.relu(F.linear(x, state[f"roi_head.bbox_head.shared_fcs.{j}.weight"], state[f"roi_head.bbox_head.shared_fcs.{j}.bias"]))
        mm_cls = F.linear(x, state["roi_head.bbox_head.fc_cls.weight"], state["roi_head.bbox_head.fc_cls.bias"])
        mm_reg = F.linear(x, state["roi_head.bbox_head.fc_reg.weight"], state["roi_head.bbox_head.fc_reg.bias"])
        y = mmdet_roi_features(p2_p5, boxes, 14)
        for j in range(cfg.MODEL.ROI_MASK_HEAD.NUM_CONV):
            name = f"roi_head.mask_head.convs.{j}.conv"
            y = F.relu(F.conv2d(y, state[f"{name}.weight"], state[f"{name}.bias"], padding=1))
        y = F.relu(F.conv_transpose2d(y, state["roi_head.mask_head.upsample.weight"], state["roi_head.mask_head.upsample.bias"], stride=2))
        mm_masks = F.conv2d(y, state["roi_head.mask_head.conv_logits.weight"], state["roi_head.mask_head.conv_logits.bias"])
    # Class K (the last) is the background in both; class-specific deltas in class-major order.
    torch.testing.assert_close(cls_logits, mm_cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(box_deltas, mm_reg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mask_logits, mm_masks, rtol=1e-5, atol=1e-5)


def test_refusals_name_the_problem():
    cfg = tiny("retinanet")
    state = release_state_dict(cfg, "retinanet", guided=True)
    with pytest.raises(ValueError, match=r"1 model tensors without a value.*head.cls_score.bias"):
        convert(cfg, {k: v for k, v in state.items() if k != "bbox_head.retina_cls.bias"})
    with pytest.raises(ValueError, match=r"tensors of no known module: bbox_head.extra.weight"):
        convert(cfg, {**state, "bbox_head.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"classes that differ .*0: 'dog' vs 'cat'"):
        convert(cfg, state, classes=["dog", "cat", "traffic light"])
    with pytest.raises(ValueError, match=r"holds a DenseCLIP RetinaNet .* the config builds a DenseCLIP mask_rcnn"):
        convert(tiny("mask_rcnn"), state)
    deeper = tiny("retinanet")
    deeper.MODEL.CLIP.LAYERS = [1, 1, 2, 1]
    with pytest.raises(ValueError, match=r"stages \[1, 1, 1, 1\].*MODEL.CLIP.LAYERS \[1, 1, 2, 1\]"):
        convert(deeper, state)
    with pytest.raises(ValueError, match=r"Not a RetinaNet or Mask R-CNN checkpoint .* \['backbone', 'neck'\]"):
        convert(cfg, {k: v for k, v in state.items() if k.startswith(("backbone.", "neck."))})


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"<html>not found</html>", "is not a checkpoint"),
    (None, "is truncated or damaged"),
])
def test_bad_files_are_refused_by_name(content, message, tmp_path):
    path = tmp_path / "release.pth"
    if content is None:  # half of a real checkpoint file
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "meta": {}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path} {message}"):
        read_release_checkpoint(str(path))
    model = build_model(tiny("retinanet"))
    with pytest.raises(ValueError, match=rf"{path} {message}"):
        DenseCLIPCheckpointer(model).load(str(path))


def test_detectron2_checkpoint_given_to_the_converter_is_named_as_such(tmp_path):
    """A checkpoint as training saves it (model, iteration, trainer) needs no conversion: say so."""
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "iteration": 659, "trainer": {}}, path)
    message = rf"{path} is already a Detectron2 checkpoint \(keys \['iteration', 'model', 'trainer'\].*MODEL.WEIGHTS {path}"
    with pytest.raises(ValueError, match=message):
        read_release_checkpoint(str(path))


def test_unconverted_release_checkpoint_as_model_weights_is_refused(tmp_path):
    cfg = tiny("retinanet")
    path = tmp_path / "release.pth"
    torch.save({"state_dict": release_state_dict(cfg, "retinanet", True), "meta": {"mmdet_version": "2.17.0"}}, path)
    with pytest.raises(ValueError, match=r"MMDetection checkpoint .* Convert it first: python tools/convert-denseclip-mmdet-to-d2.py"):
        DenseCLIPCheckpointer(build_model(cfg)).load(str(path))


COCO_CONFIGS = {
    ("retinanet", 50): "configs/COCO-Detection/retinanet_denseclip_R_50_FPN_1x.yaml",
    ("retinanet", 101): "configs/COCO-Detection/retinanet_denseclip_R_101_FPN_1x.yaml",
    ("mask_rcnn", 50): "configs/COCO-InstanceSegmentation/mask_rcnn_denseclip_R_50_FPN_1x.yaml",
    ("mask_rcnn", 101): "configs/COCO-InstanceSegmentation/mask_rcnn_denseclip_R_101_FPN_1x.yaml",
}


@pytest.mark.slow
@pytest.mark.parametrize("detector, depth", sorted(COCO_CONFIGS))
def test_the_four_released_layouts_convert_and_load(detector, depth, tmp_path):
    """Full-size release layouts (80 COCO classes) through the converter's command line, then loaded."""
    config = os.path.join(REPO, COCO_CONFIGS[(detector, depth)])
    cfg = get_denseclip_cfg(config, ["MODEL.DEVICE", "cpu"])
    classes = resolve_class_names(cfg)
    state = release_state_dict(cfg, detector, guided=True, num_classes=len(classes))
    release, output = tmp_path / "release.pth", tmp_path / "converted.pth"
    torch.save({"state_dict": state, "meta": {"CLASSES": tuple(classes), "mmdet_version": "2.17.0"}}, release)
    del state
    result = run_script(["tools/convert-denseclip-mmdet-to-d2.py", str(release), str(output)])
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"Config: {COCO_CONFIGS[(detector, depth)]}" in result.stdout
    assert f"on CLIP RN{depth}, 80 classes" in result.stdout
    model = build_model(cfg)
    converted = torch.load(output, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(converted, strict=True)


class _Pickled:
    """Any Python object that torch.load(weights_only=True) refuses to unpickle."""


def test_file_with_python_objects_is_refused_with_its_fix(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "trainer": _Pickled()}, path)
    with pytest.raises(ValueError, match=rf"{path} is a PyTorch file holding Python objects.*Save the model's state_dict"):
        read_release_checkpoint(str(path))
