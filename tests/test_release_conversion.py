"""
Converting the DenseCLIP release's MMDetection checkpoints: checkpoints of the release's layout are
written here from its module names and shapes (a table of every release tensor and the Detectron2 name
it must land on), and the converted models are checked against the release's forward pass written here
(CLIP ResNet, attention pool, text encoder, context decoder, score map, MMDetection's FPN) and the
MMDetection conventions of its heads (anchor order, box decoding, RoI level mapping), all computed on
the release's own tensors.
"""
import math
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes

from denseclip import DenseCLIPCheckpointer, get_denseclip_cfg
from denseclip.checkpoint import convert_release_state_dict, read_release_checkpoint

from helpers import REPO, relative_error, run_script, tiny_detector_cfg

CLASSES = ["cat", "dog", "traffic light"]


# ------------------------------------------------------------------ the release's layout, written down
# Each release module's tensors, named and shaped as the release's classes define them (CLIPResNet /
# CLIPResNetWithAttention, CLIPTextContextEncoder, ContextDecoder, MMDetection's FPN, RetinaHead,
# RPNHead, Shared2FCBBoxHead, FCNMaskHead), with the Detectron2 name each must land on.

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# MMDetection's FPN (ConvModule: ".conv") -> Detectron2's FPN. RetinaNet: start_level 1 (res3..res5),
# two extra convolutions "on_input" (P6 on res5, P7 on P6). Mask R-CNN: res2..res5, P6 a max pool.
RETINANET_NECK = {
    "lateral_convs.0.conv": "fpn_lateral3", "lateral_convs.1.conv": "fpn_lateral4",
    "lateral_convs.2.conv": "fpn_lateral5",
    "fpn_convs.0.conv": "fpn_output3", "fpn_convs.1.conv": "fpn_output4", "fpn_convs.2.conv": "fpn_output5",
    "fpn_convs.3.conv": "top_block.p6", "fpn_convs.4.conv": "top_block.p7",
}
MASK_RCNN_NECK = {
    "lateral_convs.0.conv": "fpn_lateral2", "lateral_convs.1.conv": "fpn_lateral3",
    "lateral_convs.2.conv": "fpn_lateral4", "lateral_convs.3.conv": "fpn_lateral5",
    "fpn_convs.0.conv": "fpn_output2", "fpn_convs.1.conv": "fpn_output3", "fpn_convs.2.conv": "fpn_output4",
    "fpn_convs.3.conv": "fpn_output5",
}
# The release's ContextDecoder layer -> this project's (the release calls the attention output "proj").
DECODER_LAYER = {
    "self_attn.q_proj.weight": "self_attn.q_proj.weight", "self_attn.k_proj.weight": "self_attn.k_proj.weight",
    "self_attn.v_proj.weight": "self_attn.v_proj.weight", "self_attn.proj.weight": "self_attn.out_proj.weight",
    "self_attn.proj.bias": "self_attn.out_proj.bias",
    "cross_attn.q_proj.weight": "cross_attn.q_proj.weight", "cross_attn.k_proj.weight": "cross_attn.k_proj.weight",
    "cross_attn.v_proj.weight": "cross_attn.v_proj.weight", "cross_attn.proj.weight": "cross_attn.out_proj.weight",
    "cross_attn.proj.bias": "cross_attn.out_proj.bias",
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias", "norm3.weight": "norm3.weight", "norm3.bias": "norm3.bias",
    "mlp.0.weight": "mlp.0.weight", "mlp.0.bias": "mlp.0.bias", "mlp.3.weight": "mlp.3.weight", "mlp.3.bias": "mlp.3.bias",
}
# Tensors whose output channels hold one group per anchor, reordered by the conversion.
ANCHOR_GROUPED = ("bbox_head.retina_cls.", "bbox_head.retina_reg.", "rpn_head.rpn_cls.", "rpn_head.rpn_reg.")


def release_layout(cfg, detector: str, guided: bool, num_classes: int = len(CLASSES)) -> dict:
    """{release key: (shape, Detectron2 name)} for every tensor of a release checkpoint of ``cfg``'s sizes."""
    clip, dc, k = cfg.MODEL.CLIP, cfg.MODEL.DENSECLIP, num_classes
    table = {}

    def add(release, shape, ours):
        table[release] = (tuple(shape), ours)

    def bn(release, channels, ours):
        for p in BN:
            add(f"{release}.{p}", () if p == "num_batches_tracked" else (channels,), f"{ours}.{p}")

    def linear(release, out, inp, ours, bias=True):
        add(f"{release}.weight", (out, inp), f"{ours}.weight")
        if bias:
            add(f"{release}.bias", (out,), f"{ours}.bias")

    def layer_norm(release, channels, ours):
        add(f"{release}.weight", (channels,), f"{ours}.weight")
        add(f"{release}.bias", (channels,), f"{ours}.bias")

    def conv(release, out, inp, size, ours, transposed=False):
        add(f"{release}.weight", (inp, out, size, size) if transposed else (out, inp, size, size), f"{ours}.weight")
        add(f"{release}.bias", (out,), f"{ours}.bias")

    # CLIP's modified ResNet (the release keeps CLIP's visual.* names under backbone.).
    w, image = clip.WIDTH, "backbone.bottom_up"
    for i, (c_in, c_out) in enumerate(((3, w // 2), (w // 2, w // 2), (w // 2, w)), start=1):
        add(f"backbone.conv{i}.weight", (c_out, c_in, 3, 3), f"{image}.conv{i}.weight")
        bn(f"backbone.bn{i}", c_out, f"{image}.bn{i}")
    channels = w
    for stage, blocks in enumerate(clip.LAYERS, start=1):
        planes = w * 2 ** (stage - 1)
        for b in range(blocks):
            block = f"layer{stage}.{b}"
            for j, (c_out, c_in, size) in enumerate(((planes, channels, 1), (planes, planes, 3), (4 * planes, planes, 1)), 1):
                add(f"backbone.{block}.conv{j}.weight", (c_out, c_in, size, size), f"{image}.{block}.conv{j}.weight")
                bn(f"backbone.{block}.bn{j}", c_out, f"{image}.{block}.bn{j}")
            if b == 0:  # the stride-2 (or widening) block: avg-pool, 1x1 conv, BN
                add(f"backbone.{block}.downsample.0.weight", (4 * planes, channels, 1, 1), f"{image}.{block}.downsample.0.weight")
                bn(f"backbone.{block}.downsample.1", 4 * planes, f"{image}.{block}.downsample.1")
            channels = 4 * planes
    if guided:
        side, embed = clip.INPUT_RESOLUTION // 32, clip.EMBED_DIM
        add("backbone.attnpool.positional_embedding", (side * side + 1, channels), f"{image}.attnpool.positional_embedding")
        for p in ("k_proj", "q_proj", "v_proj"):
            linear(f"backbone.attnpool.{p}", channels, channels, f"{image}.attnpool.{p}")
        linear("backbone.attnpool.c_proj", embed, channels, f"{image}.attnpool.c_proj")

        # CLIPTextContextEncoder (CLIP's text names), the contexts, gamma.
        tw, text = clip.TEXT.WIDTH, "backbone.score_map.text_encoder"
        add("text_encoder.token_embedding.weight", (clip.TEXT.VOCAB_SIZE, tw), f"{text}.token_embedding.weight")
        add("text_encoder.positional_embedding", (dc.PROMPT_LENGTH + dc.NUM_CONTEXT, tw), f"{text}.positional_embedding")
        for i in range(clip.TEXT.LAYERS):
            block = f"transformer.resblocks.{i}"
            add(f"text_encoder.{block}.attn.in_proj_weight", (3 * tw, tw), f"{text}.{block}.attn.in_proj_weight")
            add(f"text_encoder.{block}.attn.in_proj_bias", (3 * tw,), f"{text}.{block}.attn.in_proj_bias")
            linear(f"text_encoder.{block}.attn.out_proj", tw, tw, f"{text}.{block}.attn.out_proj")
            layer_norm(f"text_encoder.{block}.ln_1", tw, f"{text}.{block}.ln_1")
            linear(f"text_encoder.{block}.mlp.c_fc", 4 * tw, tw, f"{text}.{block}.mlp.c_fc")
            linear(f"text_encoder.{block}.mlp.c_proj", tw, 4 * tw, f"{text}.{block}.mlp.c_proj")
            layer_norm(f"text_encoder.{block}.ln_2", tw, f"{text}.{block}.ln_2")
        layer_norm("text_encoder.ln_final", tw, f"{text}.ln_final")
        add("text_encoder.text_projection", (tw, embed), f"{text}.text_projection")
        add("contexts", (1, dc.NUM_CONTEXT, tw), f"{text}.contexts")
        add("gamma", (embed,), "backbone.score_map.gamma")

        # ContextDecoder.
        dw, decoder = dc.CONTEXT_DECODER.WIDTH, "backbone.score_map.context_decoder"
        layer_norm("context_decoder.memory_proj.0", embed, f"{decoder}.memory_proj.0")
        linear("context_decoder.memory_proj.1", dw, embed, f"{decoder}.memory_proj.1")
        layer_norm("context_decoder.memory_proj.2", dw, f"{decoder}.memory_proj.2")
        layer_norm("context_decoder.text_proj.0", embed, f"{decoder}.text_proj.0")
        linear("context_decoder.text_proj.1", dw, embed, f"{decoder}.text_proj.1")
        for i in range(dc.CONTEXT_DECODER.LAYERS):
            for release, ours in DECODER_LAYER.items():
                out, inp = {"mlp.0": (4 * dw, dw), "mlp.3": (dw, 4 * dw)}.get(release[:5], (dw, dw))
                add(f"context_decoder.decoder.{i}.{release}",
                    (out, inp) if release.endswith("weight") and "norm" not in release else (out,),
                    f"{decoder}.layers.{i}.{ours}")
        layer_norm("context_decoder.out_proj.0", dw, f"{decoder}.out_proj.0")
        linear("context_decoder.out_proj.1", embed, dw, f"{decoder}.out_proj.1")

    # MMDetection's FPN; the score maps enter with res5.
    out = cfg.MODEL.FPN.OUT_CHANNELS
    fpn = "backbone.neck" if guided else "backbone"
    res5 = 32 * w + (k if guided else 0)
    neck = RETINANET_NECK if detector == "retinanet" else MASK_RCNN_NECK
    inputs = {f"fpn_lateral{s}": (w * 2 ** (s - 2) * 4 if s < 5 else res5) for s in (2, 3, 4, 5)}
    for release, ours in neck.items():
        c_in, size = (inputs[ours], 1) if ours in inputs else ((res5 if ours == "top_block.p6" else out), 3)
        conv(f"neck.{release}", out, c_in, size, f"{fpn}.{ours}")

    if detector == "retinanet":
        anchors = len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]) * len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])
        for j in range(cfg.MODEL.RETINANET.NUM_CONVS):  # Detectron2 interleaves ReLUs: subnet indices 0, 2, ...
            conv(f"bbox_head.cls_convs.{j}.conv", out, out, 3, f"head.cls_subnet.{2 * j}")
            conv(f"bbox_head.reg_convs.{j}.conv", out, out, 3, f"head.bbox_subnet.{2 * j}")
        conv("bbox_head.retina_cls", anchors * k, out, 3, "head.cls_score")
        conv("bbox_head.retina_reg", anchors * 4, out, 3, "head.bbox_pred")
    else:
        anchors, rpn = len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0]), "proposal_generator.rpn_head"
        conv("rpn_head.rpn_conv", out, out, 3, f"{rpn}.conv")
        conv("rpn_head.rpn_cls", anchors, out, 1, f"{rpn}.objectness_logits")
        conv("rpn_head.rpn_reg", anchors * 4, out, 1, f"{rpn}.anchor_deltas")
        fc, pooled = cfg.MODEL.ROI_BOX_HEAD.FC_DIM, cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        linear("roi_head.bbox_head.shared_fcs.0", fc, out * pooled * pooled, "roi_heads.box_head.fc1")
        linear("roi_head.bbox_head.shared_fcs.1", fc, fc, "roi_heads.box_head.fc2")
        linear("roi_head.bbox_head.fc_cls", k + 1, fc, "roi_heads.box_predictor.cls_score")
        linear("roi_head.bbox_head.fc_reg", 4 * k, fc, "roi_heads.box_predictor.bbox_pred")
        dim = cfg.MODEL.ROI_MASK_HEAD.CONV_DIM
        for j in range(cfg.MODEL.ROI_MASK_HEAD.NUM_CONV):
            conv(f"roi_head.mask_head.convs.{j}.conv", dim, out if j == 0 else dim, 3, f"roi_heads.mask_head.mask_fcn{j + 1}")
        conv("roi_head.mask_head.upsample", dim, dim, 2, "roi_heads.mask_head.deconv", transposed=True)
        conv("roi_head.mask_head.conv_logits", k, dim, 1, "roi_heads.mask_head.predictor")
    return table


def release_state_dict(cfg, detector: str, guided: bool, num_classes: int = len(CLASSES), seed: int = 0) -> dict:
    """A release checkpoint's state dict for ``cfg``'s sizes (release_layout), with random values of
    sensible scale: BatchNorm and LayerNorm weights around 1, weights ~ 1 / sqrt(fan-in), gamma around 1
    (not the release's 1e-4, so that the context decoder visibly changes the score maps)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (shape, _) in release_layout(cfg, detector, guided, num_classes).items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(100)
        elif name.endswith(("running_var", "gamma")) or (len(shape) == 1 and name.endswith("weight")):
            state[name] = torch.rand(shape, generator=generator) + 0.5  # BN / LN weights, variances
        elif len(shape) == 1 or name.endswith("embedding"):
            state[name] = torch.randn(shape, generator=generator) * 0.1
        else:
            fan_in = shape[0] if "upsample" in name else math.prod(shape[1:])
            state[name] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
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
    converted, report = convert_release_state_dict(state, {"CLASSES": list(classes)}, model, cfg)
    return model, converted, report


def tiny(detector):
    """The tiny detector with two context-decoder layers and a grid (8 x 8) that fits the test images,
    as the release requires."""
    cfg = tiny_detector_cfg(detector, class_names=CLASSES)
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.LAYERS = 2
    cfg.MODEL.CLIP.INPUT_RESOLUTION = 256
    return cfg


# ------------------------------------------------------------------------------------------ tests


def baseline(cfg):
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet" if cfg.MODEL.META_ARCHITECTURE == "DenseCLIPRetinaNet" else "GeneralizedRCNN"
    return cfg


@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
@pytest.mark.parametrize("guided", [True, False], ids=["denseclip", "clip"])
def test_every_release_tensor_lands_on_its_name_in_the_table(detector, guided, tmp_path):
    cfg = tiny(detector) if guided else baseline(tiny(detector))
    table = release_layout(cfg, detector, guided)
    state = release_state_dict(cfg, detector, guided)
    model, converted, report = convert(cfg, state)
    assert {ours for _, ours in table.values()} == set(model.state_dict()) == set(converted)
    assert report.mapped == len(table) == len(state)
    for release, (shape, ours) in table.items():
        expected = state[release][0] if release == "contexts" else state[release]  # the release's 1 x M x W
        assert converted[ours].shape == expected.shape, release
        if release.startswith(ANCHOR_GROUPED):  # rows reordered per anchor (checked against MMDetection below)
            assert torch.equal(converted[ours].flatten().sort().values, expected.flatten().sort().values)
        else:
            assert torch.equal(converted[ours], expected), release
    path = str(tmp_path / "converted.pth")
    torch.save({"model": converted}, path)
    DenseCLIPCheckpointer(model).load(path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in converted.items())


# ------------------------------------------------------------ the release's forward pass, written down


def mmdet_conv(x, state, name, **kwargs):
    return F.conv2d(x, state[f"{name}.weight"], state[f"{name}.bias"] if f"{name}.bias" in state else None, **kwargs)


def mmdet_bn(x, state, name):
    return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                        state[f"{name}.bias"], training=False, eps=1e-5)


def release_resnet(state, image, layers):
    """The release's CLIPResNet: 3-conv stem, 2x2 average pool; bottlenecks whose stride is an average
    pool after the 3x3 convolution (and before the shortcut's 1x1 convolution). Returns res2..res5."""
    x = image
    for i in (1, 2, 3):
        x = F.relu(mmdet_bn(mmdet_conv(x, state, f"backbone.conv{i}", stride=2 if i == 1 else 1, padding=1), state, f"backbone.bn{i}"))
    x = F.avg_pool2d(x, 2)
    outs = []
    for stage, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            name, stride = f"backbone.layer{stage}.{b}", 2 if (b == 0 and stage > 1) else 1
            out = F.relu(mmdet_bn(mmdet_conv(x, state, f"{name}.conv1"), state, f"{name}.bn1"))
            out = F.relu(mmdet_bn(mmdet_conv(out, state, f"{name}.conv2", padding=1), state, f"{name}.bn2"))
            out = mmdet_bn(mmdet_conv(F.avg_pool2d(out, stride), state, f"{name}.conv3"), state, f"{name}.bn3")
            if b == 0:
                x = mmdet_bn(mmdet_conv(F.avg_pool2d(x, stride), state, f"{name}.downsample.0"), state, f"{name}.downsample.1")
            x = F.relu(out + x)
        outs.append(x)
    return outs


def release_attention_pool(state, x, heads):
    """The release's AttentionPool2d: [mean; tokens] + the top-left H x W of its grid, one multi-head
    attention (q/k/v with bias), c_proj. Returns (global B x D, dense B x D x H x W)."""
    b, c, h, w = x.shape
    pool = "backbone.attnpool"
    positions = state[f"{pool}.positional_embedding"]
    side = int(round((positions.shape[0] - 1) ** 0.5))
    grid = positions[1:].reshape(side, side, c)[:h, :w].reshape(h * w, c)
    tokens = x.flatten(2).permute(2, 0, 1)
    tokens = torch.cat([tokens.mean(0, keepdim=True), tokens]) + torch.cat([positions[:1], grid])[:, None]
    q, k, v = (tokens @ state[f"{pool}.{p}_proj.weight"].T + state[f"{pool}.{p}_proj.bias"] for p in "qkv")
    q, k, v = (t.reshape(-1, b * heads, c // heads).transpose(0, 1) for t in (q, k, v))  # (B heads) x N x d
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c // heads), dim=-1)
    out = (weights @ v).transpose(0, 1).reshape(-1, b, c) @ state[f"{pool}.c_proj.weight"].T + state[f"{pool}.c_proj.bias"]
    return out[0], out[1:].permute(1, 2, 0).reshape(b, -1, h, w)


def layer_norm(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)


def release_text_encoder(state, class_names, prompt_length, heads):
    """The release's CLIPTextContextEncoder: [start, contexts, name tokens, end, padding] (names tokenized
    with CLIP's BPE into prompt_length positions), positions, causal CLIP blocks (QuickGELU), ln_final,
    the end token's embedding projected. Returns K x D."""
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    tokens = torch.zeros(len(class_names), prompt_length, dtype=torch.long)
    for i, name in enumerate(class_names):
        ids = [tokenizer.sot_token_id, *tokenizer.encode(name), tokenizer.eot_token_id]
        tokens[i, : len(ids)] = torch.tensor(ids)
    contexts = state["contexts"]
    x = state["text_encoder.token_embedding.weight"][tokens]
    x = torch.cat([x[:, :1], contexts.expand(len(class_names), -1, -1), x[:, 1:]], dim=1)
    x = x + state["text_encoder.positional_embedding"]
    n, width = x.shape[1], x.shape[2]
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i in range(len({k.split(".")[3] for k in state if k.startswith("text_encoder.transformer.resblocks.")})):
        block = f"text_encoder.transformer.resblocks.{i}"
        y = layer_norm(x, state, f"{block}.ln_1")
        q, k, v = (y @ state[f"{block}.attn.in_proj_weight"].T + state[f"{block}.attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(t.shape[0], n, heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads) + causal, dim=-1)
        y = (weights @ v).transpose(1, 2).reshape(x.shape)
        x = x + y @ state[f"{block}.attn.out_proj.weight"].T + state[f"{block}.attn.out_proj.bias"]
        y = layer_norm(x, state, f"{block}.ln_2") @ state[f"{block}.mlp.c_fc.weight"].T + state[f"{block}.mlp.c_fc.bias"]
        y = y * torch.sigmoid(1.702 * y)
        x = x + y @ state[f"{block}.mlp.c_proj.weight"].T + state[f"{block}.mlp.c_proj.bias"]
    x = layer_norm(x, state, "text_encoder.ln_final")
    end = tokens.argmax(dim=-1) + contexts.shape[1]
    return x[torch.arange(len(class_names)), end] @ state["text_encoder.text_projection"]


def release_context_decoder(state, text, visual, heads):
    """The release's ContextDecoder in eval mode: memory_proj (LN, Linear, LN), text_proj (LN, Linear),
    layers of [x + self_attn(norm1 x); x + cross_attn(norm2 x, memory); x + mlp(norm3 x)] with q, k, v
    projected without bias and scaled by head_dim^-0.5, then out_proj (LN, Linear)."""
    def linear(x, name):
        return x @ state[f"{name}.weight"].T + (state[f"{name}.bias"] if f"{name}.bias" in state else 0)

    def attention(query, memory, name):
        b, n, c = query.shape
        q = linear(query, f"{name}.q_proj").reshape(b, n, heads, c // heads)
        k = linear(memory, f"{name}.k_proj").reshape(b, memory.shape[1], heads, c // heads)
        v = linear(memory, f"{name}.v_proj").reshape(b, memory.shape[1], heads, c // heads)
        weights = (torch.einsum("bnhc,bmhc->bhnm", q, k) * (c // heads) ** -0.5).softmax(dim=-1)
        return linear(torch.einsum("bhnm,bmhc->bnhc", weights, v).reshape(b, n, c), f"{name}.proj")

    d = "context_decoder"
    memory = layer_norm(linear(layer_norm(visual, state, f"{d}.memory_proj.0"), f"{d}.memory_proj.1"), state, f"{d}.memory_proj.2")
    x = linear(layer_norm(text, state, f"{d}.text_proj.0"), f"{d}.text_proj.1")
    i = 0
    while f"{d}.decoder.{i}.norm1.weight" in state:
        layer = f"{d}.decoder.{i}"
        y = layer_norm(x, state, f"{layer}.norm1")
        x = x + attention(y, y, f"{layer}.self_attn")
        x = x + attention(layer_norm(x, state, f"{layer}.norm2"), memory, f"{layer}.cross_attn")
        x = x + linear(F.gelu(linear(layer_norm(x, state, f"{layer}.norm3"), f"{layer}.mlp.0")), f"{layer}.mlp.3")
        i += 1
    return linear(layer_norm(x, state, f"{d}.out_proj.0"), f"{d}.out_proj.1")


def mmdet_fpn(state, inputs, start_level, extra_on_input):
    """MMDetection 2.x's FPN: laterals of inputs[start_level:], top-down sums with nearest upsampling to
    the finer level's size, 3x3 output convolutions; then P6 by the next fpn_conv on the last input
    ("on_input", P7 by the one after on P6, no ReLU between) or by a stride-2 max pool of the last output."""
    laterals = [mmdet_conv(x, state, f"neck.lateral_convs.{i}.conv") for i, x in enumerate(inputs[start_level:])]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    outs = [mmdet_conv(x, state, f"neck.fpn_convs.{i}.conv", padding=1) for i, x in enumerate(laterals)]
    if extra_on_input:
        outs.append(mmdet_conv(inputs[-1], state, f"neck.fpn_convs.{len(laterals)}.conv", stride=2, padding=1))
        outs.append(mmdet_conv(outs[-1], state, f"neck.fpn_convs.{len(laterals) + 1}.conv", stride=2, padding=1))
    else:
        outs.append(F.max_pool2d(outs[-1], 1, stride=2))
    return outs


def release_features(cfg, state, image, detector, guided, class_names=CLASSES):
    """The release detector's extract_feat: backbone, (DenseCLIP) text features refined by the context
    decoder, gamma, score map cat'ed to res5, FPN. Returns the FPN outputs and the score map (or None)."""
    clip = cfg.MODEL.CLIP
    res = release_resnet(state, image, clip.LAYERS)
    score_map = None
    if guided:
        global_embedding, dense = release_attention_pool(state, res[-1], heads=clip.WIDTH * 32 // 64)
        text = release_text_encoder(state, class_names, cfg.MODEL.DENSECLIP.PROMPT_LENGTH, clip.TEXT.HEADS)
        text = text.expand(image.shape[0], -1, -1)
        visual = torch.cat([global_embedding[:, None], dense.flatten(2).transpose(1, 2)], dim=1)
        heads = cfg.MODEL.DENSECLIP.CONTEXT_DECODER.HEADS
        text = text + state["gamma"] * release_context_decoder(state, text, visual, heads)
        score_map = torch.einsum("bchw,bkc->bkhw", F.normalize(dense, dim=1), F.normalize(text, dim=-1)) / 0.07
        res[-1] = torch.cat([res[-1], score_map], dim=1)
    outs = mmdet_fpn(state, res, start_level=1 if detector == "retinanet" else 0, extra_on_input=detector == "retinanet")
    return outs, score_map


@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
@pytest.mark.parametrize("guided", [True, False], ids=["denseclip", "clip"])
def test_converted_backbone_and_fpn_compute_the_release_features(detector, guided):
    """The converted model's pyramid (and score map) on an image equal the release's forward pass,
    written above from its modules and MMDetection's FPN, on the release's tensors."""
    cfg = tiny(detector) if guided else baseline(tiny(detector))
    state = release_state_dict(cfg, detector, guided)
    model, converted, _ = convert(cfg, state)
    model.load_state_dict(converted)
    image = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, expected_score_map = release_features(cfg, state, image, detector, guided)
        if guided:
            features, score_map, *_ = model.backbone.forward_with_score_map(image)
        else:
            features = model.backbone(image)
    levels = ["p3", "p4", "p5", "p6", "p7"] if detector == "retinanet" else ["p2", "p3", "p4", "p5", "p6"]
    assert sorted(features) == sorted(levels)
    for level, reference in zip(levels, expected):
        assert features[level].shape == reference.shape, level
        assert relative_error(features[level], reference) < 1e-4, level
    if guided:
        assert relative_error(score_map, expected_score_map) < 1e-4


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
    with pytest.raises(ValueError, match=r"holds a DenseCLIP RetinaNet .*; the config builds a DenseCLIP Mask R-CNN"):
        convert(tiny("mask_rcnn"), state)
    deeper = tiny("retinanet")
    deeper.MODEL.CLIP.LAYERS = [1, 1, 2, 1]
    with pytest.raises(ValueError, match=r"stages \[1, 1, 1, 1\].*MODEL.CLIP.LAYERS \[1, 1, 2, 1\]"):
        convert(deeper, state)
    with pytest.raises(ValueError, match=r"Not a RetinaNet, Mask R-CNN or Semantic FPN checkpoint .* \['backbone', 'neck'\]"):
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
    with pytest.raises(ValueError, match=r"MMDetection checkpoint .* Convert it first: python tools/convert-denseclip-release-to-d2.py"):
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
    classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes
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
