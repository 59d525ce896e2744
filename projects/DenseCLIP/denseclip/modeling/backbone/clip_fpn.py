"""CLIP-FPN backbones: FPN over the CLIP ResNet, with res5 concatenated with pixel-text score maps."""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone import fpn
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from ..context_decoder import ContextDecoder
from ..score_map import SCORE_MAP_KEY, PixelTextScoreMap
from ..text_encoder import text_encoder_from_config
from .clip_resnet import CLIPResNet, clip_resnet_from_config

__all__ = [
    "LanguageGuidedCLIPResNet",
    "CLIPFPN",
    "resolve_class_names",
    "build_clip_fpn_backbone",
    "build_retinanet_clip_fpn_backbone",
]


def resolve_class_names(cfg) -> List[str]:
    """MODEL.DENSECLIP.CLASS_NAMES, or else the thing_classes of the first training (or test) dataset."""
    if cfg.MODEL.DENSECLIP.CLASS_NAMES:
        return list(cfg.MODEL.DENSECLIP.CLASS_NAMES)
    datasets = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if not datasets:
        raise ValueError(
            "DenseCLIP needs class names for its prompts: set DATASETS.TRAIN (or DATASETS.TEST) to a "
            "registered dataset, or list them in MODEL.DENSECLIP.CLASS_NAMES"
        )
    classes = MetadataCatalog.get(datasets[0]).get("thing_classes", None)
    if not classes:
        raise ValueError(
            f"Dataset {datasets[0]!r} has no thing_classes in its metadata. Register it (for a COCO "
            f"JSON: detectron2.data.datasets.register_coco_instances) before building the model, or "
            f"list the names in MODEL.DENSECLIP.CLASS_NAMES"
        )
    return list(classes)


class LastLevelP6P7(fpn.LastLevelP6P7):
    """
    RetinaNet's P6 and P7 from the top input feature: P6 = conv(x), P7 = conv(relu(P6)) as in
    Detectron2, or conv(P6) without the ReLU as in the release (MMDetection's FPN).
    """

    def __init__(self, in_channels: int, out_channels: int, in_feature: str = "res5", relu_before_p7: bool = True):
        super().__init__(in_channels, out_channels, in_feature)
        self.relu_before_p7 = relu_before_p7

    def forward(self, x):
        p6 = self.p6(x)
        return [p6, self.p7(F.relu(p6) if self.relu_before_p7 else p6)]


class LanguageGuidedCLIPResNet(Backbone):
    """
    The CLIP ResNet whose res5 output is concatenated with the pixel-text score map
    (res5 has 32w + K channels), and which also returns the score map under ``SCORE_MAP_KEY``.
    """

    def __init__(self, image_encoder: CLIPResNet, score_map: PixelTextScoreMap):
        super().__init__()
        if "res5" not in image_encoder._out_features:
            raise ValueError("DenseCLIP concatenates the score map to res5: keep res5 in MODEL.CLIP.OUT_FEATURES")
        self.image_encoder = image_encoder
        self.score_map = score_map

    @property
    def class_names(self) -> List[str]:
        return self.score_map.class_names

    def forward(self, x):
        """
        Args:
            x: B x 3 x H x W images, or an output of this module (returned unchanged, so that an FPN
               built on this module can be handed precomputed features).
        Returns:
            res2..res5 (res5: B x (32w + K) x H/32 x W/32) and SCORE_MAP_KEY: B x K x H/32 x W/32.
        """
        if isinstance(x, dict):
            return x
        features = self.image_encoder(x)
        res5 = features["res5"]
        global_embedding, dense_embedding = self.image_encoder.attention_pool(res5)
        score_map = self.score_map(global_embedding, dense_embedding)
        features["res5"] = torch.cat([res5, score_map.to(res5.dtype)], dim=1)
        features[SCORE_MAP_KEY] = score_map
        return features

    def output_shape(self):
        shapes = self.image_encoder.output_shape()
        res5 = shapes["res5"]
        shapes["res5"] = ShapeSpec(channels=res5.channels + len(self.class_names), stride=res5.stride)
        return shapes


class CLIPFPN(FPN):
    """Detectron2's FPN, which also passes on the bottom-up's score map (if any) under SCORE_MAP_KEY."""

    @property
    def class_names(self) -> Optional[List[str]]:
        """The prompt classes, or None for the plain CLIP baseline."""
        return getattr(self.bottom_up, "class_names", None)

    def forward(self, x) -> Dict[str, torch.Tensor]:
        if self.class_names is None:  # the plain CLIP baseline
            return super().forward(x)
        bottom_up_features = self.bottom_up(x)
        # LanguageGuidedCLIPResNet hands precomputed features back unchanged, so FPN's own forward
        # runs on them without computing the bottom-up twice.
        results = super().forward(bottom_up_features)
        results[SCORE_MAP_KEY] = bottom_up_features[SCORE_MAP_KEY]
        return results


def build_clip_bottom_up(cfg) -> Backbone:
    """The CLIP ResNet, language-guided when MODEL.DENSECLIP.ENABLED."""
    enabled = cfg.MODEL.DENSECLIP.ENABLED
    image_encoder = clip_resnet_from_config(cfg, with_attention_pool=enabled)
    if not enabled:
        return image_encoder
    dc = cfg.MODEL.DENSECLIP
    embed_dim = cfg.MODEL.CLIP.EMBED_DIM
    score_map = PixelTextScoreMap(
        text_encoder_from_config(cfg, resolve_class_names(cfg)),
        ContextDecoder(
            visual_dim=embed_dim,
            width=dc.CONTEXT_DECODER.WIDTH,
            heads=dc.CONTEXT_DECODER.HEADS,
            layers=dc.CONTEXT_DECODER.LAYERS,
            dropout=dc.CONTEXT_DECODER.DROPOUT,
        ),
        embed_dim=embed_dim,
        tau=dc.TAU,
        gamma_init=dc.GAMMA_INIT,
    )
    return LanguageGuidedCLIPResNet(image_encoder, score_map)


def _check_input(input_shape: ShapeSpec):
    if input_shape.channels != 3:
        raise ValueError(f"CLIP's image encoder takes 3 input channels, got {input_shape.channels}")


@BACKBONE_REGISTRY.register()
def build_clip_fpn_backbone(cfg, input_shape: ShapeSpec):
    """CLIP-FPN for two-stage detectors: P2..P5 from res2..res5 and a max-pooled P6."""
    _check_input(input_shape)
    return CLIPFPN(
        bottom_up=build_clip_bottom_up(cfg),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_retinanet_clip_fpn_backbone(cfg, input_shape: ShapeSpec):
    """CLIP-FPN for RetinaNet: P3..P5 from res3..res5, P6/P7 from res5 (score map included)."""
    _check_input(input_shape)
    bottom_up = build_clip_bottom_up(cfg)
    res5_channels = bottom_up.output_shape()["res5"].channels
    return CLIPFPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(
            res5_channels, cfg.MODEL.FPN.OUT_CHANNELS, relu_before_p7=cfg.MODEL.FPN.RELU_BEFORE_P7
        ),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
