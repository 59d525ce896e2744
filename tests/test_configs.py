"""The 8 COCO configs of the paper's tables: each builds on CPU with the parameter count worked out in
closed form from the release's architecture (text encoder excluded: its output is cached), which rounds
to the paper's, and runs one inference."""
import os

import pytest

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from denseclip.modeling import ScoreMapLoss, task_of
from denseclip import add_denseclip_config

from helpers import assert_detects_on_random_image, conv, inference_parameters, score_map_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's tables: parameters in millions.
PAPER_PARAMS = {
    "COCO-Detection/retinanet_clip_R_50_FPN_1x.yaml": 38,
    "COCO-Detection/retinanet_denseclip_R_50_FPN_1x.yaml": 60,
    "COCO-Detection/retinanet_clip_R_101_FPN_1x.yaml": 57,
    "COCO-Detection/retinanet_denseclip_R_101_FPN_1x.yaml": 78,
    "COCO-InstanceSegmentation/mask_rcnn_clip_R_50_FPN_1x.yaml": 44,
    "COCO-InstanceSegmentation/mask_rcnn_denseclip_R_50_FPN_1x.yaml": 67,
    "COCO-InstanceSegmentation/mask_rcnn_clip_R_101_FPN_1x.yaml": 63,
    "COCO-InstanceSegmentation/mask_rcnn_denseclip_R_101_FPN_1x.yaml": 84,
}


def load(config):
    cfg = get_cfg()
    add_denseclip_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", config))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def clip_resnet_parameters(layers, width: int = 64) -> int:
    """CLIP's modified ResNet without its attention pool: a 3-conv stem (width / 2, width / 2, width) and
    bottlenecks (1x1, 3x3, 1x1 convolutions without bias, each with a BatchNorm's weight and bias; the
    first block of every stage has a 1x1 projection shortcut)."""
    bn = lambda c: 2 * c  # noqa: E731
    half = width // 2
    total = conv(3, half, 3, False) + bn(half) + conv(half, half, 3, False) + bn(half) + conv(half, width, 3, False) + bn(width)
    channels = width
    for stage, blocks in enumerate(layers):
        mid = width * 2**stage
        out = 4 * mid
        for block in range(blocks):
            total += conv(channels, mid, 1, False) + bn(mid) + conv(mid, mid, 3, False) + bn(mid)
            total += conv(mid, out, 1, False) + bn(out)
            total += conv(channels, out, 1, False) + bn(out) if block == 0 else 0
            channels = out
    return total


def attention_pool_parameters(embed: int, grid: int = 42, channels: int = 2048) -> int:
    """(grid^2 + 1) positions, q/k/v projections with bias, the output projection to the embedding size."""
    return (grid * grid + 1) * channels + 3 * conv(channels, channels, 1) + conv(channels, embed, 1)


def fpn_and_heads_parameters(kind: str, classes: int, res5: int = 2048) -> int:
    """Detectron2's FPN (256 channels; ``res5`` input channels, the score maps' included) and heads."""
    if kind == "retinanet":
        total = sum(conv(c, 256, 1) + conv(256, 256, 3) for c in (512, 1024, res5))
        total += conv(res5, 256, 3) + conv(256, 256, 3)  # P6 on res5 (with the score maps), P7
        return total + 8 * conv(256, 256, 3) + conv(256, 9 * classes, 3) + conv(256, 9 * 4, 3)
    total = sum(conv(c, 256, 1) + conv(256, 256, 3) for c in (256, 512, 1024, res5))
    total += conv(256, 256, 3) + conv(256, 3, 1) + conv(256, 12, 1)  # RPN, 3 anchors a location
    total += conv(256 * 7 * 7, 1024, 1) + conv(1024, 1024, 1) + conv(1024, classes + 1, 1) + conv(1024, 4 * classes, 1)
    return total + 4 * conv(256, 256, 3) + conv(256, 256, 2) + conv(256, classes, 1)  # mask head


def coco_config_parameters(config: str, classes: int = 80) -> int:
    rn101, denseclip = "R_101" in config, "denseclip" in config
    embed = 512 if rn101 else 1024
    total = clip_resnet_parameters([3, 4, 23, 3] if rn101 else [3, 4, 6, 3])
    if denseclip:
        total += attention_pool_parameters(embed) + score_map_parameters(embed)
    kind = "retinanet" if "retinanet" in config else "mask_rcnn"
    return total + fpn_and_heads_parameters(kind, classes, 2048 + (classes if denseclip else 0))


@pytest.mark.parametrize("config", sorted(PAPER_PARAMS))
def test_full_size_config_builds_counts_and_infers(config):
    cfg = load(config)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # random weights
    model = build_model(cfg).eval()
    params = inference_parameters(model)
    print(f"{config}: {params / 1e6:.2f}M parameters")
    assert params == coco_config_parameters(config)
    assert round(params / 1e6) == PAPER_PARAMS[config]
    assert_detects_on_random_image(model, masks="mask_rcnn" in config)


@pytest.mark.parametrize("config", sorted(PAPER_PARAMS))
def test_release_recipe(config):
    cfg = load(config)
    denseclip = "denseclip" in config
    assert cfg.MODEL.META_ARCHITECTURE == {
        (True, True): "DenseCLIPRetinaNet", (True, False): "RetinaNet",
        (False, True): "DenseCLIPRCNN", (False, False): "GeneralizedRCNN",
    }[("retinanet" in config, denseclip)]
    assert cfg.INPUT.FORMAT == "RGB" and cfg.INPUT.MIN_SIZE_TRAIN == (800,) and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx([0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255])
    assert cfg.MODEL.PIXEL_STD == pytest.approx([0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255])
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.WEIGHT_DECAY == 1e-4
    # No decay only where the parameter's name contains "norm"; trained, synchronised BatchNorm.
    assert cfg.SOLVER.WEIGHT_DECAY_NORM == 1e-4 and cfg.SOLVER.NO_WEIGHT_DECAY_KEYS == ["norm"]
    assert cfg.MODEL.CLIP.NORM == "SyncBN" and cfg.MODEL.CLIP.FREEZE_AT == 0
    # the release's score-map targets: box cells (the detectors' rule, chosen by the meta-architecture)
    assert cfg.MODEL.CLIP.ACTIVATION == "QuickGELU" and ScoreMapLoss(cfg, task_of(cfg)).target == "box"
    assert cfg.MODEL.FPN.RELU_BEFORE_P7 is False
    assert cfg.SOLVER.BASE_LR == (1e-4 if "retinanet" in config else 2e-4) and cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 0.1
    assert cfg.SOLVER.WARMUP_ITERS == 500 and cfg.SOLVER.WARMUP_FACTOR == 0.001
    assert cfg.SOLVER.STEPS == (60000, 82500) and cfg.SOLVER.MAX_ITER == 90000
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
    assert cfg.MODEL.CLIP.LAYERS == ([3, 4, 23, 3] if "R_101" in config else [3, 4, 6, 3])


def test_all_coco_class_names_fit_the_prompt():
    from detectron2.data import MetadataCatalog

    from denseclip.modeling import tokenize_class_names

    names = MetadataCatalog.get("coco_2017_train").thing_classes
    assert tokenize_class_names(names, prompt_length=5).shape == (80, 5)


def detectron2_r50_parameters() -> int:
    """Detectron2's ResNet-50: convolutions without bias; its frozen BatchNorm holds buffers only."""
    total, channels = conv(3, 64, 7, bias=False), 64
    for blocks, mid, out in ((3, 64, 256), (4, 128, 512), (6, 256, 1024), (3, 512, 2048)):
        for block in range(blocks):
            total += conv(channels, mid, 1, False) + conv(mid, mid, 3, False) + conv(mid, out, 1, False)
            total += conv(channels, out, 1, False) if block == 0 else 0  # the projection shortcut
            channels = out
    return total


IMAGENET_CONFIGS = {
    "COCO-Detection/retinanet_denseclip_R_50_ImageNet_FPN_1x.yaml": "retinanet",
    "COCO-InstanceSegmentation/mask_rcnn_denseclip_R_50_ImageNet_FPN_1x.yaml": "mask_rcnn",
}


def imagenet_config_parameters(kind: str, classes: int = 80, embed: int = 1024) -> int:
    """R-50, a new attention pool on res5 (42 x 42 grid + 1, q/k/v/out projections), the score-map parts
    (context decoder, gamma, 8 contexts of width 512), FPN on res5 + K score maps, and the heads."""
    total = detectron2_r50_parameters() + attention_pool_parameters(embed) + score_map_parameters(embed)
    return total + fpn_and_heads_parameters(kind, classes, 2048 + classes)


@pytest.mark.parametrize("config", sorted(IMAGENET_CONFIGS))
def test_imagenet_configs_build_and_count(config):
    from denseclip.modeling.backbone import AttentionPooledBackbone

    cfg = load(config)
    model = build_model(cfg).eval()
    assert isinstance(model.backbone.bottom_up, AttentionPooledBackbone)
    assert type(model.backbone.bottom_up.net).__name__ == "ResNet"
    assert inference_parameters(model) == imagenet_config_parameters(IMAGENET_CONFIGS[config])
    assert cfg.INPUT.FORMAT == "BGR" and cfg.MODEL.BACKBONE.FREEZE_AT == 2 and cfg.MODEL.RESNETS.NORM == "FrozenBN"
    assert cfg.MODEL.DENSECLIP.TEXT_WEIGHTS == "pretrained/RN50.pt" and cfg.MODEL.WEIGHTS.endswith("R-50.pkl")
