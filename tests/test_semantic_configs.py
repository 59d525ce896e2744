"""
The six ADE20K Semantic FPN configs of the release (and DenseCLIP on ImageNet R-50): their recipe, and
their parameter counts (text encoder excluded, as the release counts) against arithmetic written here
and the release's own counts (31.04 / 50.25 / 50.04 / 67.80 / 101.28 / 105.27 M). Models are built on
the meta device: no weights are allocated and nothing runs.
"""
import os

import pytest
import torch

import detectron2.data.transforms as T
from detectron2.modeling import META_ARCH_REGISTRY

from denseclip import get_denseclip_cfg
from denseclip.data import SemSegDatasetMapper
from denseclip.data.transforms import PhotometricDistortion, RandomScaleResize

from helpers import REPO, conv, inference_parameters, score_map_parameters

CONFIGS = {
    "semantic_fpn_clip_R_50_512x512_80k.yaml": 31.04,
    "semantic_fpn_denseclip_R_50_512x512_80k.yaml": 50.25,
    "semantic_fpn_clip_R_101_512x512_80k.yaml": 50.04,
    "semantic_fpn_denseclip_R_101_512x512_80k.yaml": 67.80,
    "semantic_fpn_clip_ViT_B_16_512x512_80k.yaml": 101.28,
    "semantic_fpn_denseclip_ViT_B_16_512x512_80k.yaml": 105.27,
}
IMAGENET = "semantic_fpn_denseclip_R_50_ImageNet_512x512_80k.yaml"
K = 150


def load(name):
    return get_denseclip_cfg(os.path.join(REPO, "configs", "ADE20K-SemanticSegmentation", name), ["MODEL.DEVICE", "cpu"])


def build_on_meta(cfg):
    with torch.device("meta"):
        return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)


def bn(channels):
    return 2 * channels


def clip_resnet_parameters(layers):
    """CLIP's modified ResNet without its attention pool: 3-conv stem (32, 32, 64) and bottlenecks (1x1,
    3x3, 1x1 with BatchNorm; a 1x1 projection with BatchNorm in each stage's first block)."""
    total = conv(3, 32, 3, False) + bn(32) + conv(32, 32, 3, False) + bn(32) + conv(32, 64, 3, False) + bn(64)
    channels = 64
    for stage, blocks in enumerate(layers):
        planes = 64 * 2**stage
        for block in range(blocks):
            total += conv(channels, planes, 1, False) + bn(planes) + conv(planes, planes, 3, False) + bn(planes)
            total += conv(planes, 4 * planes, 1, False) + bn(4 * planes)
            if block == 0:
                total += conv(channels, 4 * planes, 1, False) + bn(4 * planes)
            channels = 4 * planes
    return total


def attention_pool_parameters(embed, grid=16):
    """16 x 16 + 1 positions of width 2048; q, k, v (2048 -> 2048) and the output projection (-> embed)."""
    return (grid * grid + 1) * 2048 + 3 * conv(2048, 2048, 1) + conv(2048, embed, 1)


def vit_b16_parameters(grid, embeddings):
    """CLIP ViT-B/16 with a grid x grid positional grid; ln_post and the 768 -> 512 projection for DenseCLIP."""
    w = 768
    block = bn(w) + (3 * w * w + 3 * w) + (w * w + w) + bn(w) + (w * 4 * w + 4 * w) + (4 * w * w + w)
    total = conv(3, w, 16, False) + w + (grid * grid + 1) * w + bn(w) + 12 * block
    return total + (bn(w) + w * 512 if embeddings else 0)


def vit_pyramid_parameters():
    """fpn1: GroupNorm, 2 transposed 2x2 convs (with bias), BatchNorm; fpn2: GroupNorm, 1 transposed conv;
    fpn3 and fpn4: GroupNorm."""
    w = 768
    return 4 * bn(w) + 3 * conv(w, w, 2) + bn(w)


def fpn_parameters(in_channels):
    """FPN without norm: 1x1 lateral and 3x3 output convolutions with bias, 256 channels."""
    return sum(conv(c, 256, 1) + conv(256, 256, 3) for c in in_channels)


def head_parameters():
    """Semantic FPN head: 1 + 1 + 2 + 3 blocks of 3x3 conv (no bias) + BatchNorm for strides 4..32, and
    the 1x1 classifier."""
    return 7 * (conv(256, 256, 3, False) + bn(256)) + conv(256, K, 1)


def expected_parameters(name):
    denseclip = "denseclip" in name
    scores = K if denseclip else 0
    if "ViT" in name:
        total = vit_b16_parameters(40, denseclip) + vit_pyramid_parameters() + fpn_parameters([768, 768, 768 + scores, 768])
        embed = 512
    else:
        embed = 512 if "R_101" in name else 1024
        total = clip_resnet_parameters([3, 4, 23, 3] if "R_101" in name else [3, 4, 6, 3])
        total += fpn_parameters([256, 512, 1024, 2048 + scores])
        total += attention_pool_parameters(embed) if denseclip else 0
    total += head_parameters()
    return total + (score_map_parameters(embed) if denseclip else 0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_counts(name):
    model = build_on_meta(load(name))
    count = inference_parameters(model)
    assert count == expected_parameters(name)
    assert count / 1e6 == pytest.approx(CONFIGS[name], abs=0.01)


def test_imagenet_config_counts():
    from test_configs import detectron2_r50_parameters

    cfg = load(IMAGENET)
    model = build_on_meta(cfg)
    bottom_up = model.backbone.bottom_up
    assert type(bottom_up).__name__ == "AttentionPooledBackbone" and type(bottom_up.net).__name__ == "ResNet"
    # Detectron2's R-50 with trained (synchronised) BatchNorm: 2 parameters per channel of each norm.
    norms = sum(2 * m.num_features for m in bottom_up.net.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase))
    expected = detectron2_r50_parameters() + norms + attention_pool_parameters(1024)
    expected += fpn_parameters([256, 512, 1024, 2048 + K]) + head_parameters() + score_map_parameters(1024)
    assert inference_parameters(model) == expected
    assert cfg.INPUT.FORMAT == "BGR" and cfg.MODEL.DENSECLIP.TEXT_WEIGHTS == "pretrained/RN50.pt"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.RESNETS.NORM == "SyncBN"


@pytest.mark.parametrize("name", sorted(CONFIGS) + [IMAGENET])
def test_release_recipe(name):
    cfg = load(name)
    denseclip, vit = "denseclip" in name, "ViT" in name
    assert cfg.MODEL.META_ARCHITECTURE == ("DenseCLIPSemanticSegmentor" if denseclip else "SlidingWindowSemanticSegmentor")
    assert cfg.DATASETS.TRAIN == ("ade20k_sem_seg_train",) and cfg.DATASETS.TEST == ("ade20k_sem_seg_val",)
    head = cfg.MODEL.SEM_SEG_HEAD
    assert (head.NAME, head.NUM_CLASSES, head.IGNORE_VALUE, head.CONVS_DIM, head.NORM) == (
        "SemanticFPNHead", 150, 255, 256, "SyncBN"
    )
    assert head.DROPOUT == 0.1 and head.LOSS_NORMALIZATION == "all" and head.LOSS_WEIGHT == 1.0
    assert cfg.MODEL.FPN.OUT_CHANNELS == 256 and cfg.MODEL.FPN.NORM == ""
    crop, stride, short = ((640, 640), (426, 426), 640) if vit else ((512, 512), (341, 341), 512)
    assert cfg.TEST.SEM_SEG.MODE == "slide" and tuple(cfg.TEST.SEM_SEG.CROP_SIZE) == crop
    assert tuple(cfg.TEST.SEM_SEG.STRIDE) == stride
    assert cfg.INPUT.MIN_SIZE_TEST == short and cfg.INPUT.MAX_SIZE_TEST == 2048
    # the training pipeline as the mapper builds it: resize to (2048, 512 or 640) x 0.5-2.0, crops with
    # at most 75% of one class (255 not counted), flip 0.5, photometric distortion 32 / 0.5-1.5 / 0.5-1.5 / 18
    resize, category_crop, flip, distortion = SemSegDatasetMapper(cfg, is_train=True).augmentations.augs
    assert isinstance(resize, RandomScaleResize)
    assert tuple(resize.scale) == (2048, short) and tuple(resize.ratio_range) == (0.5, 2.0)
    assert isinstance(category_crop, T.RandomCrop_CategoryAreaConstraint)
    assert category_crop.crop_aug.crop_type == "absolute" and tuple(category_crop.crop_aug.crop_size) == crop
    assert category_crop.single_category_max_area == 0.75 and category_crop.ignored_category == 255
    assert isinstance(flip, T.RandomFlip) and flip.horizontal and not flip.vertical and flip.prob == 0.5
    assert isinstance(distortion, PhotometricDistortion) and distortion.image_format == cfg.INPUT.FORMAT
    assert (distortion.brightness_delta, tuple(distortion.contrast_range), tuple(distortion.saturation_range),
            distortion.hue_delta) == (32, (0.5, 1.5), (0.5, 1.5), 18)
    assert cfg.TEST.AUG.SCALE_RATIOS == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and cfg.TEST.AUG.FLIP
    solver = cfg.SOLVER
    assert (solver.OPTIMIZER, solver.BASE_LR, solver.WEIGHT_DECAY, solver.BACKBONE_MULTIPLIER) == ("ADAMW", 1e-4, 1e-4, 0.1)
    assert solver.LR_SCHEDULER_NAME == "WarmupPolyLR" and solver.POLY_LR_POWER == 0.9 and solver.POLY_LR_MIN == 1e-6
    assert (solver.WARMUP_METHOD, solver.WARMUP_ITERS, solver.WARMUP_FACTOR) == ("linear", 1500, 1e-6)
    assert solver.MAX_ITER == 80000 and solver.IMS_PER_BATCH == 32 and not solver.CLIP_GRADIENTS.ENABLED
    if denseclip:
        dense = cfg.MODEL.DENSECLIP
        assert (dense.PROMPT_LENGTH, dense.NUM_CONTEXT, dense.TAU) == (5, 8, 0.07)
        assert dense.SCORE_CONCAT_WITH_TAU is False and dense.SCORE_MAP_LOSS.WEIGHT == 0.4
        assert dense.SCORE_CONCAT_FEATURE == ("s16" if vit else "")
        assert (dense.CONTEXT_DECODER.LAYERS, dense.CONTEXT_DECODER.WIDTH, dense.CONTEXT_DECODER.HEADS) == (3, 256, 4)
    if vit:
        clip = cfg.MODEL.CLIP
        assert clip.INPUT_RESOLUTION == 640 and clip.EMBED_DIM == 512 and clip.VIT.OUT_INDICES == [3, 5, 7, 11]
        assert clip.VIT.CLASS_EMBEDDING_IN_POSITION and clip.VIT.DROP_PATH_RATE == (0.1 if denseclip else 0.0)
    elif "ImageNet" not in name:
        assert cfg.MODEL.CLIP.INPUT_RESOLUTION == 512 and cfg.MODEL.CLIP.ATTENTION_POOL_GRID == "resize"
        assert cfg.MODEL.CLIP.EMBED_DIM == (512 if "R_101" in name else 1024)


# Where the release's names (MMSegmentation's ADE20K classes) differ from the first synonym of
# Detectron2's ADE20K stuff_classes, same order: index -> (Detectron2, release).
RENAMED = {
    8: ("window", "windowpane"), 37: ("tub", "bathtub"), 38: ("rail", "railing"), 87: ("street lamp", "streetlight"),
    89: ("tv", "television receiver"), 90: ("plane", "airplane"), 92: ("clothes", "apparel"),
    109: ("pool", "swimming pool"), 113: ("falls", "waterfall"), 138: ("trash can", "ashcan"),
}


def test_class_names_are_the_release_s_in_detectron2_s_order_and_fit_the_prompt():
    from detectron2.data import MetadataCatalog

    from denseclip.modeling import tokenize_class_names

    names = load("semantic_fpn_denseclip_R_50_512x512_80k.yaml").MODEL.DENSECLIP.CLASS_NAMES
    stuff = MetadataCatalog.get("ade20k_sem_seg_val").stuff_classes
    assert len(names) == len(stuff) == 150
    for index, (name, synonyms) in enumerate(zip(names, stuff)):
        first = synonyms.split(",")[0].strip()
        assert (first, name) == RENAMED.get(index, (name, name)), index
    assert tokenize_class_names(names, prompt_length=5).shape == (150, 5)
    with pytest.raises(ValueError, match="too long"):  # why Detectron2's names are not used as they are
        tokenize_class_names(stuff, prompt_length=5)
