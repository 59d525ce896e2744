"""
Converting the DenseCLIP release's segmentation checkpoints (MMSegmentation 0.19: Semantic FPN on CLIP
RN50 / RN101 / ViT-B, DenseCLIP or the CLIP baseline): checkpoints of the release's layout are written
here from a hand-written table of its module names and shapes, with the Detectron2 name each tensor
must land on; the converted FPN and decode head are checked against MMSegmentation's FPN and FPNHead
written out below with torch's functional ops.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling import build_model

from denseclip import get_denseclip_cfg
from denseclip.checkpoint import convert_release_state_dict, infer_release_layout

from helpers import REPO, run_script, tiny_detector_cfg, tiny_sem_seg_cfg

CLASSES = ["wall", "bed ", "traffic light"]  # the release's spelling: "bed " tokenizes as "bed"


# --------------------------------------------------------- the release's layout, written down by hand


class Table:
    """Release tensor name -> (shape, Detectron2 name), and random values of those shapes."""

    def __init__(self):
        self.rows = {}

    def add(self, name, shape, target):
        self.rows[name] = (tuple(shape), target)

    def norm(self, name, channels, target, running=True):
        """BatchNorm (weight, bias, running stats, step count), or LayerNorm / GroupNorm (weight, bias)."""
        for part in ("weight", "bias") + (("running_mean", "running_var", "num_batches_tracked") if running else ()):
            self.add(f"{name}.{part}", [] if part == "num_batches_tracked" else [channels], f"{target}.{part}")

    def linear(self, name, out_features, in_features, target, bias=True):
        self.add(f"{name}.weight", [out_features, in_features], f"{target}.weight")
        if bias:
            self.add(f"{name}.bias", [out_features], f"{target}.bias")

    def values(self, seed=0, device="cpu"):
        generator = torch.Generator().manual_seed(seed)
        state = {}
        for name, (shape, _) in self.rows.items():
            if device == "meta":
                state[name] = torch.empty(shape, device="meta")
            elif name.endswith("num_batches_tracked"):
                state[name] = torch.tensor(1000)
            elif name.endswith("running_var"):
                state[name] = torch.rand(shape, generator=generator) + 0.5
            else:
                fan_in = math.prod(shape[1:]) if len(shape) > 1 else 16
                state[name] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        return state


def residual_attention_blocks(table, prefix, target, width, blocks):
    """CLIP's transformer blocks (nn.MultiheadAttention with packed q/k/v, QuickGELU MLP)."""
    for i in range(blocks):
        name, to = f"{prefix}.resblocks.{i}", f"{target}.resblocks.{i}"
        table.add(f"{name}.attn.in_proj_weight", [3 * width, width], f"{to}.attn.in_proj_weight")
        table.add(f"{name}.attn.in_proj_bias", [3 * width], f"{to}.attn.in_proj_bias")
        table.linear(f"{name}.attn.out_proj", width, width, f"{to}.attn.out_proj")
        table.norm(f"{name}.ln_1", width, f"{to}.ln_1", running=False)
        table.linear(f"{name}.mlp.c_fc", 4 * width, width, f"{to}.mlp.c_fc")
        table.linear(f"{name}.mlp.c_proj", width, 4 * width, f"{to}.mlp.c_proj")
        table.norm(f"{name}.ln_2", width, f"{to}.ln_2", running=False)


def release_semseg_table(cfg, guided: bool, vit: bool, num_classes: int, layers=None) -> Table:
    """
    The release's segmentor for ``cfg``'s sizes: ``backbone`` (CLIPResNet / CLIPResNetWithAttention with
    CLIP's visual names, or CLIPVisionTransformer with its fpn1..fpn4), ``text_encoder``, ``contexts``,
    ``gamma``, ``context_decoder`` (DenseCLIP only), ``neck`` (mmseg FPN: lateral_convs / fpn_convs as
    ConvModules without norm) and ``decode_head`` (FPNHead: per level ConvModules with SyncBN "bn" at
    Sequential indices 0, 2, 4 between the upsamplers; conv_seg). The identity head has no tensors.
    """
    clip, t = cfg.MODEL.CLIP, Table()
    fpn = "backbone.neck" if guided else "backbone"
    k, d = num_classes, clip.EMBED_DIM
    if vit:
        p, w, n = clip.VIT.PATCH_SIZE, clip.VIT.WIDTH, clip.VIT.LAYERS
        to = "backbone.bottom_up.vit"
        grid = clip.INPUT_RESOLUTION // p
        t.add("backbone.class_embedding", [w], f"{to}.class_embedding")
        t.add("backbone.positional_embedding", [grid * grid + 1, w], f"{to}.positional_embedding")
        t.add("backbone.conv1.weight", [w, 3, p, p], f"{to}.conv1.weight")
        t.norm("backbone.ln_pre", w, f"{to}.ln_pre", running=False)
        residual_attention_blocks(t, "backbone.transformer", f"{to}.transformer", w, n)
        if guided:
            t.norm("backbone.ln_post", w, f"{to}.ln_post", running=False)
            t.add("backbone.proj", [w, d], f"{to}.proj")
        pyramid = "backbone.bottom_up"
        t.norm("backbone.fpn1.0", w, f"{pyramid}.fpn1.0", running=False)  # GroupNorm(1)
        t.add("backbone.fpn1.1.weight", [w, w, 2, 2], f"{pyramid}.fpn1.1.weight")  # ConvTranspose: in x out
        t.add("backbone.fpn1.1.bias", [w], f"{pyramid}.fpn1.1.bias")
        t.norm("backbone.fpn1.2", w, f"{pyramid}.fpn1.2")  # SyncBN; fpn1.3 is the GELU
        t.add("backbone.fpn1.4.weight", [w, w, 2, 2], f"{pyramid}.fpn1.4.weight")
        t.add("backbone.fpn1.4.bias", [w], f"{pyramid}.fpn1.4.bias")
        t.norm("backbone.fpn2.0", w, f"{pyramid}.fpn2.0", running=False)
        t.add("backbone.fpn2.1.weight", [w, w, 2, 2], f"{pyramid}.fpn2.1.weight")
        t.add("backbone.fpn2.1.bias", [w], f"{pyramid}.fpn2.1.bias")
        t.norm("backbone.fpn3", w, f"{pyramid}.fpn3", running=False)
        t.norm("backbone.fpn4.0", w, f"{pyramid}.fpn4.0", running=False)  # fpn4.1 is the max pool
        in_channels = [w, w, w, w]
        concat = 2
    else:
        w, to = clip.WIDTH, "backbone.bottom_up"
        stem = [(1, w // 2, 3), (2, w // 2, w // 2), (3, w, w // 2)]
        for i, out_channels, in_channels_ in stem:
            t.add(f"backbone.conv{i}.weight", [out_channels, in_channels_, 3, 3], f"{to}.conv{i}.weight")
            t.norm(f"backbone.bn{i}", out_channels, f"{to}.bn{i}")
        inplanes = w
        for stage, blocks in enumerate(layers or clip.LAYERS, start=1):
            planes = w * 2 ** (stage - 1)
            for b in range(blocks):
                name, target = f"backbone.layer{stage}.{b}", f"{to}.layer{stage}.{b}"
                t.add(f"{name}.conv1.weight", [planes, inplanes, 1, 1], f"{target}.conv1.weight")
                t.norm(f"{name}.bn1", planes, f"{target}.bn1")
                t.add(f"{name}.conv2.weight", [planes, planes, 3, 3], f"{target}.conv2.weight")
                t.norm(f"{name}.bn2", planes, f"{target}.bn2")
                t.add(f"{name}.conv3.weight", [4 * planes, planes, 1, 1], f"{target}.conv3.weight")
                t.norm(f"{name}.bn3", 4 * planes, f"{target}.bn3")
                if b == 0:  # stride 2 or a width change: avg-pool ("-1") + 1x1 conv + BN
                    t.add(f"{name}.downsample.0.weight", [4 * planes, inplanes, 1, 1], f"{target}.downsample.0.weight")
                    t.norm(f"{name}.downsample.1", 4 * planes, f"{target}.downsample.1")
                inplanes = 4 * planes
        if guided:
            c, grid = 32 * w, clip.INPUT_RESOLUTION // 32
            t.add("backbone.attnpool.positional_embedding", [grid * grid + 1, c], f"{to}.attnpool.positional_embedding")
            for proj in ("q_proj", "k_proj", "v_proj"):
                t.linear(f"backbone.attnpool.{proj}", c, c, f"{to}.attnpool.{proj}")
            t.linear("backbone.attnpool.c_proj", d, c, f"{to}.attnpool.c_proj")
        in_channels = [4 * w, 8 * w, 16 * w, 32 * w]
        concat = 3
    if guided:
        text, dc = clip.TEXT, cfg.MODEL.DENSECLIP
        to = "backbone.score_map.text_encoder"
        t.add("text_encoder.token_embedding.weight", [text.VOCAB_SIZE, text.WIDTH], f"{to}.token_embedding.weight")
        t.add("text_encoder.positional_embedding", [dc.PROMPT_LENGTH + dc.NUM_CONTEXT, text.WIDTH], f"{to}.positional_embedding")
        residual_attention_blocks(t, "text_encoder.transformer", f"{to}.transformer", text.WIDTH, text.LAYERS)
        t.norm("text_encoder.ln_final", text.WIDTH, f"{to}.ln_final", running=False)
        t.add("text_encoder.text_projection", [text.WIDTH, d], f"{to}.text_projection")
        t.add("contexts", [1, dc.NUM_CONTEXT, text.WIDTH], f"{to}.contexts")  # ours: NUM_CONTEXT x width
        t.add("gamma", [d], "backbone.score_map.gamma")
        cd, width, to = "context_decoder", dc.CONTEXT_DECODER.WIDTH, "backbone.score_map.context_decoder"
        t.norm(f"{cd}.memory_proj.0", d, f"{to}.memory_proj.0", running=False)
        t.linear(f"{cd}.memory_proj.1", width, d, f"{to}.memory_proj.1")
        t.norm(f"{cd}.memory_proj.2", width, f"{to}.memory_proj.2", running=False)
        t.norm(f"{cd}.text_proj.0", d, f"{to}.text_proj.0", running=False)
        t.linear(f"{cd}.text_proj.1", width, d, f"{to}.text_proj.1")
        for i in range(dc.CONTEXT_DECODER.LAYERS):
            layer, target = f"{cd}.decoder.{i}", f"{to}.layers.{i}"
            for attention in ("self_attn", "cross_attn"):
                for proj in ("q_proj", "k_proj", "v_proj"):
                    t.linear(f"{layer}.{attention}.{proj}", width, width, f"{target}.{attention}.{proj}", bias=False)
                t.linear(f"{layer}.{attention}.proj", width, width, f"{target}.{attention}.out_proj")
            for j in (1, 2, 3):
                t.norm(f"{layer}.norm{j}", width, f"{target}.norm{j}", running=False)
            t.linear(f"{layer}.mlp.0", 4 * width, width, f"{target}.mlp.0")
            t.linear(f"{layer}.mlp.3", width, 4 * width, f"{target}.mlp.3")
        t.norm(f"{cd}.out_proj.0", width, f"{to}.out_proj.0", running=False)
        t.linear(f"{cd}.out_proj.1", d, width, f"{to}.out_proj.1")  # back to the visual width
        in_channels[concat] += k
    out = cfg.MODEL.FPN.OUT_CHANNELS
    for i, channels in enumerate(in_channels):
        t.add(f"neck.lateral_convs.{i}.conv.weight", [out, channels, 1, 1], f"{fpn}.fpn_lateral{i + 2}.weight")
        t.add(f"neck.lateral_convs.{i}.conv.bias", [out], f"{fpn}.fpn_lateral{i + 2}.bias")
        t.add(f"neck.fpn_convs.{i}.conv.weight", [out, out, 3, 3], f"{fpn}.fpn_output{i + 2}.weight")
        t.add(f"neck.fpn_convs.{i}.conv.bias", [out], f"{fpn}.fpn_output{i + 2}.bias")
    channels = cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
    for i, stride in enumerate((4, 8, 16, 32)):
        for step in range(max(1, int(math.log2(stride // 4)))):
            j = 2 * step if stride > 4 else 0  # an Upsample after each conv above stride 4
            name, target = f"decode_head.scale_heads.{i}.{j}", f"sem_seg_head.p{i + 2}.{j}"
            t.add(f"{name}.conv.weight", [channels, out if step == 0 else channels, 3, 3], f"{target}.weight")
            t.norm(f"{name}.bn", channels, f"{target}.norm")
    t.add("decode_head.conv_seg.weight", [k, channels, 1, 1], "sem_seg_head.predictor.weight")
    t.add("decode_head.conv_seg.bias", [k], "sem_seg_head.predictor.bias")
    return t


def tiny(guided: bool, vit: bool):
    cfg = tiny_sem_seg_cfg(denseclip=guided, vit=vit, class_names=[c.strip() for c in CLASSES])
    cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"  # SyncBN runs as BN on one CPU process; the same tensors
    cfg.TEST.SEM_SEG.MODE = "whole"
    return cfg


def convert(cfg, state, meta=None):
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    meta = {"CLASSES": tuple(CLASSES), "mmseg_version": "0.19.0"} if meta is None else meta
    converted, report = convert_release_state_dict(state, meta, model, cfg)
    return model, converted, report


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("vit", [False, True], ids=["resnet", "vit"])
@pytest.mark.parametrize("guided", [True, False], ids=["denseclip", "clip"])
def test_every_tensor_lands_where_the_table_says(guided, vit):
    cfg = tiny(guided, vit)
    table = release_semseg_table(cfg, guided, vit, len(CLASSES))
    state = table.values()
    layout = infer_release_layout(state)
    assert (layout.detector, layout.language_guided, layout.num_classes) == ("semantic_fpn", guided, 3)
    model, converted, report = convert(cfg, state)
    model.load_state_dict(converted, strict=True)
    loaded = model.state_dict()
    assert report.mapped == len(table.rows) == len(loaded)
    for name, (shape, target) in table.rows.items():
        expected = state[name][0] if name == "contexts" else state[name]
        assert torch.equal(loaded[target], expected.to(loaded[target].dtype)), (name, target)
    assert "names are the config's" in report.summary()


def release_fpn_and_head(inputs, state, align_corners=False):
    """MMSegmentation 0.19's FPN (laterals, top-down nearest resizing to the finer level's size, 3x3
    outputs) and FPNHead (per level 3x3 conv + BN (eval) + ReLU stacks, x2 bilinear upsampling above
    stride 4, the levels resized to stride 4 and summed, conv_seg; dropout is the identity in eval), then
    the segmentor's resize of the logits to the input (bilinear, align_corners False)."""
    laterals = [F.conv2d(x, state[f"neck.lateral_convs.{i}.conv.weight"], state[f"neck.lateral_convs.{i}.conv.bias"])
                for i, x in enumerate(inputs)]
    for i in range(3, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    outs = [F.conv2d(x, state[f"neck.fpn_convs.{i}.conv.weight"], state[f"neck.fpn_convs.{i}.conv.bias"], padding=1)
            for i, x in enumerate(laterals)]
    total = None
    for i, x in enumerate(outs):
        for step in range(max(1, i)):
            name = f"decode_head.scale_heads.{i}.{2 * step}"
            x = F.conv2d(x, state[f"{name}.conv.weight"], padding=1)
            x = F.batch_norm(x, state[f"{name}.bn.running_mean"], state[f"{name}.bn.running_var"],
                             state[f"{name}.bn.weight"], state[f"{name}.bn.bias"], eps=1e-5)
            x = F.relu(x)
            if i > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=align_corners)
        total = x if total is None else total + F.interpolate(x, size=total.shape[2:], mode="bilinear", align_corners=align_corners)
    logits = F.conv2d(total, state["decode_head.conv_seg.weight"], state["decode_head.conv_seg.bias"])
    return outs, logits


@pytest.mark.parametrize("height, width", [(64, 96), (72, 100)], ids=["multiple_of_32", "not_multiple_of_32"])
@pytest.mark.parametrize("vit", [False, True], ids=["resnet", "vit"])
def test_converted_fpn_and_decode_head_follow_mmsegmentation(vit, height, width):
    """Also on an image whose sides are not multiples of 32, which the release runs as it is: its FPN
    resizes each level to the finer one's size, its head each level to stride 4."""
    cfg = tiny(True, vit)
    state = release_semseg_table(cfg, True, vit, len(CLASSES)).values(seed=1)
    model, converted, _ = convert(cfg, state)
    model.load_state_dict(converted)
    captured = {}
    model.backbone.neck.register_forward_pre_hook(lambda module, args: captured.update(features=dict(args[0])))
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        (output,) = model([{"image": image, "height": height, "width": width}])
        neck = model.backbone.neck(captured["features"])
        inputs = [captured["features"][name] for name in cfg.MODEL.FPN.IN_FEATURES]
        outs, logits = release_fpn_and_head(inputs, state)
    assert inputs[2 if vit else 3].shape[1] == converted[f"backbone.neck.fpn_lateral{4 if vit else 5}.weight"].shape[1]
    for i, name in enumerate(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES):
        torch.testing.assert_close(neck[name], outs[i], rtol=1e-5, atol=1e-5)
    expected = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(output["sem_seg"], expected, rtol=1e-4, atol=1e-4)


def test_wrong_layouts_are_refused_by_name():
    cfg = tiny(True, False)
    table = release_semseg_table(cfg, True, False, len(CLASSES))
    state = table.values(device="meta")
    # A detection checkpoint into a segmentation config.
    from test_release_conversion import release_state_dict

    detection = release_state_dict(tiny_detector_cfg("retinanet"), "retinanet", guided=True)
    with pytest.raises(ValueError, match=r"holds a DenseCLIP RetinaNet .*; the config builds a DenseCLIP Semantic FPN"):
        convert(cfg, detection, meta={"CLASSES": ("cat", "dog", "traffic light")})
    # RN101 stages (3, 4, 23, 3) for the config's ResNet.
    rn101 = release_semseg_table(cfg, True, False, len(CLASSES), layers=[3, 4, 23, 3]).values(device="meta")
    with pytest.raises(ValueError, match=r"DenseCLIP Semantic FPN on CLIP RN101, 3 classes; the config builds .*"
                                         r"\(MODEL.CLIP.LAYERS \[1, 1, 1, 1\].*semantic_fpn_denseclip_R_101_512x512_80k.yaml"):
        convert(cfg, rn101)
    # A ViT checkpoint for a ResNet config, a CLIP baseline for a DenseCLIP config.
    vit = release_semseg_table(tiny(True, True), True, True, len(CLASSES)).values(device="meta")
    with pytest.raises(ValueError, match=r"on CLIP a ViT with patch 16, width 64, 4 blocks, 3 classes; the config builds"):
        convert(cfg, vit)
    baseline = release_semseg_table(tiny(False, False), False, False, len(CLASSES)).values(device="meta")
    with pytest.raises(ValueError, match=r"holds a CLIP baseline Semantic FPN .*; the config builds a DenseCLIP Semantic FPN"):
        convert(cfg, baseline)
    # COCO-Stuff's 171 classes into a 3-class config.
    stuff = release_semseg_table(cfg, True, False, 171).values(device="meta")
    with pytest.raises(ValueError, match=r"classifier has 171 classes, the config's model 3 \(wall, bed, traffic light"):
        convert(cfg, stuff, meta={"CLASSES": tuple(f"class {i}" for i in range(171))})
    # Other names, or the same names in another order.
    with pytest.raises(ValueError, match=r"differ from the config's 3 \(1: 'tree' vs 'bed'\)"):
        convert(cfg, state, meta={"CLASSES": ("wall", "tree", "traffic light")})
    with pytest.raises(ValueError, match=r"0: 'bed ' vs 'wall'; 1: 'wall' vs 'bed'"):
        convert(cfg, state, meta={"CLASSES": ("bed ", "wall", "traffic light")})
    # Missing and extra tensors.
    with pytest.raises(ValueError, match=r"1 model tensors without a value.*sem_seg_head.p3.0.norm.running_var"):
        convert(cfg, {k: v for k, v in state.items() if k != "decode_head.scale_heads.1.0.bn.running_var"})
    with pytest.raises(ValueError, match=r"1 tensors of no known module: auxiliary_head.conv_seg.weight"):
        convert(cfg, {**state, "auxiliary_head.conv_seg.weight": torch.empty(3, 16, 1, 1, device="meta")})
    wider = dict(state, **{"decode_head.conv_seg.weight": torch.empty(3, 32, 1, 1, device="meta")})
    with pytest.raises(ValueError, match=r"1 shapes differ: sem_seg_head.predictor.weight: \(3, 32, 1, 1\) vs model \(3, 16, 1, 1\)"):
        convert(cfg, wider)


RELEASE_CONFIGS = {  # the release's six segmentation layouts -> the matching repository config
    (True, "RN50"): "configs/ADE20K-SemanticSegmentation/semantic_fpn_denseclip_R_50_512x512_80k.yaml",
    (True, "RN101"): "configs/ADE20K-SemanticSegmentation/semantic_fpn_denseclip_R_101_512x512_80k.yaml",
    (True, "ViT-B/16"): "configs/ADE20K-SemanticSegmentation/semantic_fpn_denseclip_ViT_B_16_512x512_80k.yaml",
    (False, "RN50"): "configs/ADE20K-SemanticSegmentation/semantic_fpn_clip_R_50_512x512_80k.yaml",
    (False, "RN101"): "configs/ADE20K-SemanticSegmentation/semantic_fpn_clip_R_101_512x512_80k.yaml",
    (False, "ViT-B/16"): "configs/ADE20K-SemanticSegmentation/semantic_fpn_clip_ViT_B_16_512x512_80k.yaml",
}


@pytest.mark.parametrize("guided, backbone", sorted(RELEASE_CONFIGS), ids=lambda x: str(x).replace("/", "_"))
def test_the_release_full_size_layouts_convert_exactly(guided, backbone):
    """The full-size layouts (150 ADE20K classes): inferred, matched to their config, every name and shape
    exact. Tensors and model on the meta device: shapes without memory or time."""
    config = RELEASE_CONFIGS[(guided, backbone)]
    cfg = get_denseclip_cfg(os.path.join(REPO, config), ["MODEL.DEVICE", "meta", "MODEL.WEIGHTS", ""])
    classes = list(cfg.MODEL.DENSECLIP.CLASS_NAMES)  # the release's ADE20K names, in the base config
    table = release_semseg_table(cfg, guided, backbone.startswith("ViT"), len(classes))
    state = table.values(device="meta")
    layout = infer_release_layout(state)
    assert str(layout) == f"{'DenseCLIP' if guided else 'CLIP baseline'} Semantic FPN on CLIP {backbone}, 150 classes"
    assert layout.config_file() == config
    model = build_model(cfg)
    converted, report = convert_release_state_dict(state, {"CLASSES": tuple(classes)}, model, cfg, classes)
    own = model.state_dict()
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in own.items()}
    # The release keeps its contexts as 1 x 8 x 512, ours as 8 x 512.
    expected = {target: shape[1:] if name == "contexts" else shape for name, (shape, target) in table.rows.items()}
    assert expected == {k: tuple(v.shape) for k, v in own.items()}
    assert report.mapped == len(table.rows)


def test_command_line_converts_states_and_keeps_the_release_meta(tmp_path):
    cfg = tiny(True, False)
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    table = release_semseg_table(cfg, True, False, len(CLASSES))
    release, output = tmp_path / "release.pth", tmp_path / "converted.pth"
    meta = {"CLASSES": tuple(CLASSES), "PALETTE": [[120, 120, 120], [4, 200, 3], [41, 10, 150]], "mmseg_version": "0.19.0"}
    torch.save({"state_dict": table.values(), "meta": meta}, release)
    result = run_script(["tools/convert-denseclip-release-to-d2.py", "--config-file", str(config), str(release), str(output)])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Found: DenseCLIP Semantic FPN on CLIP a ResNet with stages [1, 1, 1, 1], 3 classes." in result.stdout
    assert "Classes: the checkpoint's 3 names are the config's, in its order." in result.stdout
    converted = torch.load(output, map_location="cpu", weights_only=True)
    assert converted["release_meta"] == {**meta, "CLASSES": tuple(CLASSES)}
    assert {target for _, target in table.rows.values()} == set(converted["model"])
    # A detection checkpoint given for this config: the tool names the file and what it found.
    from test_release_conversion import release_state_dict

    detection = tmp_path / "retinanet.pth"
    torch.save({"state_dict": release_state_dict(tiny_detector_cfg("retinanet"), "retinanet", True), "meta": {}}, detection)
    result = run_script(["tools/convert-denseclip-release-to-d2.py", "--config-file", str(config), str(detection), str(output)])
    assert result.returncode != 0
    assert f"Not converted: {detection}: The checkpoint holds a DenseCLIP RetinaNet" in result.stdout
