"""CLIP ViT-B/16 for detection: the CLIPVisionTransformer backbone, its simple feature pyramids, CLIP
weights, drop path, the four COCO configs and training the detectors on it."""
import copy
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage

from denseclip import add_denseclip_config
from denseclip.checkpoint import DenseCLIPCheckpointer, as_clip_state_dict, load_clip_weights
from denseclip.modeling import (
    CLIPVisionTransformer,
    LanguageGuidedBackbone,
    build_clip_fpn_backbone,
    build_retinanet_clip_vit_sfp_backbone,
)
from denseclip.solver import build_optimizer
from denseclip.utils.analysis import count_flops

from helpers import (
    backbone_cfg,
    REPO,
    assert_detects_on_random_image,
    conv,
    inference_parameters,
    relative_error,
    score_map_parameters,
    tiny_cfg,
    tiny_open_clip,
    tiny_open_clip_vit,
    tiny_vit_cfg,
    tiny_vit_detector_cfg,
    training_batch,
)

VIT_B_16 = "ViT-B-16-quickgelu"  # OpenAI's ViT-B/16: patch 16, width 768, 12 blocks, 12 heads, QuickGELU
NAMES = ["person", "dog"]


def vit_b16_cfg(denseclip=True, retinanet=True):
    """A backbone config for CLIP ViT-B/16 and its text encoder, with two classes."""
    cfg = tiny_vit_cfg(denseclip=denseclip, retinanet=retinanet, class_names=NAMES)
    cfg.MODEL.CLIP.VIT.PATCH_SIZE, cfg.MODEL.CLIP.VIT.WIDTH = 16, 768
    cfg.MODEL.CLIP.VIT.LAYERS, cfg.MODEL.CLIP.VIT.HEADS = 12, 12
    cfg.MODEL.CLIP.EMBED_DIM, cfg.MODEL.CLIP.INPUT_RESOLUTION = 512, 224
    cfg.MODEL.CLIP.TEXT.WIDTH, cfg.MODEL.CLIP.TEXT.HEADS, cfg.MODEL.CLIP.TEXT.LAYERS = 512, 8, 12
    return cfg


def open_clip_embeddings(clip, images):
    """open_clip's encode_image, and its patch tokens through ln_post and the projection (read off
    ln_post, which open_clip applies to every token before taking the class token's)."""
    normed = []
    hook = clip.visual.ln_post.register_forward_hook(lambda module, inputs, output: normed.append(output))
    try:
        pooled = clip.encode_image(images)
    finally:
        hook.remove()
    return pooled, normed[0][:, 1:] @ clip.visual.proj


def as_map(tokens, height, width):
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


# ---------------------------------------------------------------------------------------------------
# CLIP ViT-B/16 weights through MODEL.WEIGHTS
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_b16_backbone():
    """The DenseCLIP RetinaNet backbone on CLIP ViT-B/16 (random weights until a test loads some)."""
    torch.manual_seed(0)
    return build_retinanet_clip_vit_sfp_backbone(backbone_cfg(vit_b16_cfg()), ShapeSpec(channels=3)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("file_format", ["torchscript", "state_dict"])
def test_vit_b16_loaded_through_model_weights_equals_open_clip(
    file_format, vit_b16_backbone, open_clip_models, clip_checkpoints, caplog
):
    """Loaded from an OpenAI-style TorchScript archive or an open_clip state dict, the global embedding
    at 224 px is open_clip's encode_image and the dense embedding its projected patch tokens; the text
    encoder is CLIP's; the positional grid is kept as stored."""
    clip, backbone = open_clip_models(VIT_B_16), vit_b16_backbone
    with torch.no_grad():
        for param in backbone.parameters():
            param.zero_()  # whatever an earlier test loaded
    with caplog.at_level("INFO"):
        DenseCLIPCheckpointer(backbone).load(clip_checkpoints(VIT_B_16)[file_format])
    assert "Loaded CLIP weights" in caplog.text and "text-encoder tensors" in caplog.text
    assert "ViT positional grid 14x14 (197 x 768) kept" in caplog.text
    encoder = backbone.bottom_up
    assert isinstance(encoder, CLIPVisionTransformer) and encoder.positional_embedding.shape == (197, 768)
    clip_state = clip.state_dict()
    assert all(torch.equal(v, clip_state[f"visual.{k}"]) for k, v in encoder.state_dict().items())

    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_global, expected_tokens = open_clip_embeddings(clip, images)
        features, global_embedding, dense = encoder.forward_with_embeddings(images)
    assert features["last_feat"].shape == (2, 768, 14, 14)
    assert dense.shape == (2, 512, 14, 14) and global_embedding.shape == (2, 512)
    assert relative_error(global_embedding, expected_global) <= 1e-5
    assert relative_error(dense, as_map(expected_tokens, 14, 14)) <= 1e-5

    text = backbone.score_map.text_encoder
    assert torch.equal(text.token_embedding.weight, clip.token_embedding.weight)
    assert torch.equal(text.positional_embedding, clip.positional_embedding[:13])


def test_vit_b16_non_square_inputs(vit_b16_backbone):
    """An input taller and narrower than the pretraining grid: the embeddings are those of open_clip's
    ViT-B/16 (the same weights) with its 14 x 14 grid resized bilinearly to 16 x 12."""
    encoder = vit_b16_backbone.bottom_up
    with torch.device("meta"):  # no initialisation: the weights are the encoder's
        reference = VisionTransformer(
            image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0, output_dim=512,
            act_layer=QuickGELU,
        )
    reference.load_state_dict(encoder.state_dict(), assign=True)
    reference = open_clip_at(SimpleNamespace(visual=reference, encode_image=reference), 16, 12)
    images = torch.randn(1, 3, 256, 192, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected_global, expected_tokens = open_clip_embeddings(reference, images)
        features, global_embedding, dense = encoder.forward_with_embeddings(images)
    assert features["last_feat"].shape == (1, 768, 16, 12)
    assert relative_error(global_embedding, expected_global) <= 1e-5
    assert relative_error(dense, as_map(expected_tokens, 16, 12)) <= 1e-5
    assert encoder.output_shape() == {"last_feat": ShapeSpec(channels=768, stride=16)}


# ---------------------------------------------------------------------------------------------------
# A tiny ViT: exact function at any size, drop path, the CLIP baseline, wrong weights
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory):
    clip = tiny_open_clip_vit()
    path = tmp_path_factory.mktemp("tiny_vit") / "tiny_vit.pt"
    torch.save(clip.state_dict(), path)
    return clip, str(path)


def tiny_vit_backbone(cfg=None):
    torch.manual_seed(0)
    return build_backbone(backbone_cfg(cfg or tiny_vit_cfg())).eval()


def open_clip_at(clip, height, width):
    """open_clip's ViT with its positional grid resized (bilinear, written out here) to height x width."""
    clip = copy.deepcopy(clip)
    pos = clip.visual.positional_embedding.detach()
    side = int((pos.shape[0] - 1) ** 0.5)
    grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    clip.visual.positional_embedding = nn.Parameter(torch.cat([pos[:1], grid.flatten(2)[0].t()]))
    return clip


@pytest.mark.parametrize("size", [(64, 64), (96, 128), (160, 48)])
def test_tiny_vit_equals_open_clip_at_any_size(tiny_vit_file, size):
    """At the pretraining size CLIP's function; at others, CLIP's with the grid resized bilinearly."""
    clip, path = tiny_vit_file
    backbone = tiny_vit_backbone()
    DenseCLIPCheckpointer(backbone).load(path)
    height, width = size[0] // 16, size[1] // 16
    reference = clip if size == (64, 64) else open_clip_at(clip, height, width)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected_global, expected_tokens = open_clip_embeddings(reference, images)
        features, global_embedding, dense = backbone.bottom_up.forward_with_embeddings(images)
    assert relative_error(global_embedding, expected_global) <= 1e-5
    assert relative_error(dense, as_map(expected_tokens, height, width)) <= 1e-5
    assert features["last_feat"].shape == (2, 64, height, width)


def test_drop_path_per_sample_at_linear_rates(tiny_vit_file):
    """Each block's attention and MLP branches are dropped per sample in training, at rates rising
    linearly to DROP_PATH_RATE (kept branches scaled by 1 / (1 - p)); eval mode is CLIP's function."""
    clip, path = tiny_vit_file
    cfg = tiny_vit_cfg()
    cfg.MODEL.CLIP.VIT.LAYERS = 4
    cfg.MODEL.CLIP.VIT.DROP_PATH_RATE = 0.6
    torch.manual_seed(0)
    encoder = CLIPVisionTransformer(backbone_cfg(cfg))
    rates = [0.0, 0.2, 0.4, 0.6]
    assert encoder.drop_path_rates == pytest.approx(rates)
    for block, rate in zip(encoder.transformer.resblocks, rates):
        assert (block.ls_1.p, block.ls_1.mode, block.ls_2.p, block.ls_2.mode) == pytest.approx((rate, "row", rate, "row"))

    dropped = {}  # (block, branch) -> fraction of samples whose branch output is zero

    def record(name):
        def hook(module, inputs, output):
            branch, out = inputs[0].flatten(1), output.flatten(1)
            zero = (out == 0).all(dim=1)
            kept = ~zero
            torch.testing.assert_close(out[kept], branch[kept] / (1 - module.p))  # scaled, whole samples
            dropped[name] = zero.float().mean().item()
        return hook

    hooks = []
    for index, block in enumerate(encoder.transformer.resblocks):
        hooks.append(block.ls_1.register_forward_hook(record((index, "attention"))))
        hooks.append(block.ls_2.register_forward_hook(record((index, "mlp"))))
    images = torch.randn(1000, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    encoder.train()
    with torch.no_grad():
        encoder(images)
    for hook in hooks:
        hook.remove()
    assert len(dropped) == 8
    for (index, _), fraction in dropped.items():
        assert fraction == pytest.approx(rates[index], abs=0.05), (index, fraction)

    # Eval mode: deterministic and CLIP's function; training without drop path changes nothing else.
    clip = tiny_open_clip_vit(layers=4)
    clip.visual.load_state_dict(encoder.state_dict())
    cfg.MODEL.CLIP.VIT.DROP_PATH_RATE = 0.0
    plain = CLIPVisionTransformer(backbone_cfg(cfg))
    plain.load_state_dict(encoder.state_dict())
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    encoder.eval()
    with torch.no_grad():
        first = encoder.forward_with_embeddings(images)[1]
        second = encoder.forward_with_embeddings(images)[1]
        expected = clip.encode_image(images)
        trained_without_drop = plain.train().forward_with_embeddings(images)[1]
    assert torch.equal(first, second) and relative_error(first, expected) <= 1e-5
    torch.testing.assert_close(trained_without_drop, first)


def test_drop_path_keeps_clip_parameter_names():
    clip_names = set(tiny_open_clip_vit().visual.state_dict())
    cfg = tiny_vit_cfg()
    cfg.MODEL.CLIP.VIT.DROP_PATH_RATE = 0.1
    assert set(CLIPVisionTransformer(backbone_cfg(cfg)).state_dict()) == clip_names


def test_clip_baseline_has_no_embeddings_and_loads_the_image_encoder_only(tiny_vit_file, caplog):
    clip, path = tiny_vit_file
    backbone = tiny_vit_backbone(tiny_vit_cfg(denseclip=False))
    assert not isinstance(backbone, LanguageGuidedBackbone)
    encoder = backbone.net
    assert encoder.proj is None and encoder.ln_post is None
    with caplog.at_level("INFO"):
        DenseCLIPCheckpointer(backbone).load(path)
    assert "0 text-encoder tensors" in caplog.text
    assert "visual.ln_post and visual.proj (the CLIP baseline uses no embeddings)" in caplog.text
    torch.testing.assert_close(encoder.conv1.weight, clip.visual.conv1.weight)
    with pytest.raises(RuntimeError, match="without its output projection"):
        encoder.forward_with_embeddings(torch.zeros(1, 3, 64, 64))
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "p2": (16, 24), "p3": (8, 12), "p4": (4, 6), "p5": (2, 3), "p6": (1, 2)
    }


def test_language_guided_pyramid_reads_the_score_map():
    """DenseCLIP: the score map (K channels) is concatenated to the stride-16 map before the pyramid."""
    backbone = tiny_vit_backbone(tiny_vit_cfg(retinanet=True))
    assert isinstance(backbone, LanguageGuidedBackbone) and backbone.in_feature == "last_feat"
    first = backbone.neck.simfp_3[0]  # P3: the transposed convolution on the concatenation
    assert first.in_channels == 64 + 3
    assert backbone.padding_constraints == {"size_divisibility": 32, "square_size": 0}
    with torch.no_grad():
        features, score_map, *_ = backbone.forward_with_score_map(torch.zeros(1, 3, 64, 96))
    assert score_map.shape == (1, 3, 4, 6)
    assert list(features) == ["p3", "p4", "p5", "p6", "p7"]
    assert [tuple(v.shape[-2:]) for v in features.values()] == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]


@pytest.mark.slow
def test_rn50_and_vit_b16_weights_swapped_are_clear_errors(open_clip_models):
    """RN50 weights into the ViT-B/16 config and ViT-B/16 weights into the RN50 config are refused,
    naming both architectures, with nothing half-loaded."""
    vit = build_retinanet_clip_vit_sfp_backbone(backbone_cfg(vit_b16_cfg(denseclip=False)), ShapeSpec(channels=3))
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_clip_weights(vit, as_clip_state_dict(open_clip_models("RN50-quickgelu").state_dict()), "RN50.pt")
    message = str(error.value)
    assert "RN50.pt" in message and "(CLIP RN50)" in message and "(CLIP ViT-B/16)" in message
    assert "ViT_B_16 for ViT-B/16" in message
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())

    rn50 = get_cfg()
    add_denseclip_config(rn50)
    rn50.merge_from_file(os.path.join(REPO, "configs/COCO-Detection/retinanet_clip_R_50_FPN_1x.yaml"))
    rn50.MODEL.DEVICE = "cpu"
    with pytest.raises(ValueError) as error:
        load_clip_weights(build_backbone(backbone_cfg(rn50)), as_clip_state_dict(open_clip_models(VIT_B_16).state_dict()))
    message = str(error.value)
    assert "holds a vision transformer" in message and "(CLIP ViT-B/16)" in message
    assert "with a ResNet image encoder" in message and "(CLIP RN50)" in message


def test_other_vit_or_a_resnet_is_a_clear_error(tmp_path):
    torch.save(tiny_open_clip_vit(layers=3).state_dict(), tmp_path / "deeper.pt")
    torch.save(tiny_open_clip().state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match=r"deeper.pt.*VIT.LAYERS 3.*VIT.LAYERS 2"):
        DenseCLIPCheckpointer(tiny_vit_backbone()).load(str(tmp_path / "deeper.pt"))
    with pytest.raises(ValueError, match=r"holds a ResNet image encoder.*configured \(MODEL.CLIP\) with a vision"):
        DenseCLIPCheckpointer(tiny_vit_backbone()).load(str(tmp_path / "resnet.pt"))
    with pytest.raises(ValueError, match=r"holds a vision transformer.*configured \(MODEL.CLIP\) with a ResNet"):
        DenseCLIPCheckpointer(build_clip_fpn_backbone(backbone_cfg(tiny_cfg()), ShapeSpec(channels=3))).load(str(tmp_path / "deeper.pt"))


# ---------------------------------------------------------------------------------------------------
# Detectors on a tiny ViT: a training step, the optimizer's groups, FLOPs without unsupported ops
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn"])
def test_tiny_vit_denseclip_detector_trains_a_step(kind):
    cfg = tiny_vit_detector_cfg(kind)
    assert cfg.MODEL.CLIP.VIT.DROP_PATH_RATE == 0.1 and cfg.MODEL.FPN.NORM == "LN"
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    encoder, text = model.backbone.bottom_up, model.backbone.score_map.text_encoder
    assert isinstance(encoder, CLIPVisionTransformer)
    group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert group[id(encoder.conv1.weight)]["lr"] == pytest.approx(cfg.SOLVER.BASE_LR * 0.1)
    assert group[id(encoder.proj)]["lr"] == pytest.approx(cfg.SOLVER.BASE_LR * 0.1)
    assert group[id(text.contexts)]["lr"] == pytest.approx(cfg.SOLVER.BASE_LR)
    assert group[id(model.backbone.neck.simfp_4[0].weight)]["lr"] == pytest.approx(cfg.SOLVER.BASE_LR)

    with EventStorage():
        losses = model(training_batch(with_masks=kind == "mask_rcnn"))
    assert "loss_score_map" in losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    for param in (text.contexts, encoder.conv1.weight, encoder.proj, encoder.positional_embedding):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    assert text.token_embedding.weight.grad is None  # the text encoder stays frozen
    optimizer.step()


@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn"])
def test_tiny_vit_flops_have_no_unsupported_ops(kind):
    cfg = tiny_vit_detector_cfg(kind)
    model = build_model(cfg).eval()
    inference, text = count_flops(model, [{"image": torch.rand(3, 64, 96) * 255, "height": 64, "width": 96}])
    assert not inference.unsupported and not text.unsupported, (inference.unsupported, text.unsupported)
    assert inference.by_module["backbone.bottom_up"] > 0 and inference.by_module["backbone.neck"] > 0


# ---------------------------------------------------------------------------------------------------
# The four COCO configs at full size
# ---------------------------------------------------------------------------------------------------
VIT_CONFIGS = [
    "COCO-Detection/retinanet_clip_ViT_B_16_FPN_1x.yaml",
    "COCO-Detection/retinanet_denseclip_ViT_B_16_FPN_1x.yaml",
    "COCO-InstanceSegmentation/mask_rcnn_clip_ViT_B_16_FPN_1x.yaml",
    "COCO-InstanceSegmentation/mask_rcnn_denseclip_ViT_B_16_FPN_1x.yaml",
]


def vit_b16_parameters(embeddings: bool) -> int:
    """CLIP ViT-B/16: patch embedding, class token, 14 x 14 + 1 positions, ln_pre, 12 blocks; ln_post
    and the 768 -> 512 projection only for DenseCLIP (the dense embeddings)."""
    w = 768
    block = 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * 4 * w + 4 * w) + (4 * w * w + w)
    total = conv(3, w, 16, bias=False) + w + (14 * 14 + 1) * w + 2 * w + 12 * block
    return total + (2 * w + w * 512 if embeddings else 0)


def pyramid_parameters(c_in: int, scales, out=256) -> int:
    """SimpleFeaturePyramid with LN (convolutions without bias; LN's weight and bias)."""
    total = 0
    for scale in scales:
        dim = c_in
        if scale == 4:  # deconv, LN, GELU, deconv
            total += conv(c_in, c_in // 2, 2) + 2 * (c_in // 2) + conv(c_in // 2, c_in // 4, 2)
            dim = c_in // 4
        elif scale == 2:
            total += conv(c_in, c_in // 2, 2)
            dim = c_in // 2
        total += conv(dim, out, 1, bias=False) + 2 * out + conv(out, out, 3, bias=False) + 2 * out
    return total


def expected_parameters(config: str) -> int:
    denseclip, classes = "denseclip" in config, 80
    c_in = 768 + (classes if denseclip else 0)
    total = vit_b16_parameters(embeddings=denseclip) + (score_map_parameters(512) if denseclip else 0)
    if "retinanet" in config:
        anchors = 9
        total += pyramid_parameters(c_in, (2, 1, 0.5)) + 2 * conv(256, 256, 3)  # P3-P5; P6, P7
        total += 8 * conv(256, 256, 3) + conv(256, anchors * classes, 3) + conv(256, anchors * 4, 3)
    else:
        total += pyramid_parameters(c_in, (4, 2, 1, 0.5))  # P2-P5; P6 is a max pool
        total += conv(256, 256, 3) + conv(256, 3, 1) + conv(256, 12, 1)  # RPN, 3 anchors
        total += conv(256 * 7 * 7, 1024, 1) + conv(1024, 1024, 1)  # box head: 2 FC
        total += conv(1024, classes + 1, 1) + conv(1024, 4 * classes, 1)  # class and box predictors
        total += 4 * conv(256, 256, 3) + conv(256, 256, 2) + conv(256, classes, 1)  # mask head
    return total


@pytest.mark.slow
@pytest.mark.parametrize("config", VIT_CONFIGS)
def test_full_size_vit_config_builds_counts_and_infers(config):
    cfg = get_cfg()
    add_denseclip_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", config))
    assert cfg.MODEL.WEIGHTS == "pretrained/ViT-B-16.pt" and cfg.MODEL.CLIP.EMBED_DIM == 512
    assert cfg.MODEL.CLIP.VIT.DROP_PATH_RATE == 0.1 and cfg.MODEL.CLIP.INPUT_RESOLUTION == 224
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1
    assert cfg.SOLVER.MAX_ITER == 90000 and cfg.SOLVER.STEPS == (60000, 82500)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # random weights
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST, cfg.TEST.DETECTIONS_PER_IMAGE = 100, 10  # a quicker inference
    model = build_model(cfg).eval()
    assert inference_parameters(model) == expected_parameters(config)
    print(f"{config}: {inference_parameters(model) / 1e6:.2f}M parameters")
    assert_detects_on_random_image(model, masks="mask_rcnn" in config)
