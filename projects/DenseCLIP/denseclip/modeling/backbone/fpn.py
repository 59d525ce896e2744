"""CLIP-FPN backbones: Detectron2's FPN on the CLIP ResNet (or any bottom-up with a new attention pool),
language-guided for DenseCLIP detectors and semantic segmentors."""
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone import fpn
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from .attention_pool import AttentionPooledBackbone
from .clip_resnet import CLIPResNet
from .language_guided import with_language_guidance

__all__ = [
    "LastLevelP6P7",
    "SizeMatchingFPN",
    "build_attention_pool_fpn_backbone",
    "build_clip_fpn_backbone",
    "build_fpn",
    "build_retinanet_attention_pool_fpn_backbone",
    "build_retinanet_clip_fpn_backbone",
    "build_semantic_attention_pool_fpn_backbone",
    "build_semantic_clip_fpn_backbone",
]

#: The levels an FPN adds above its inputs: a max-pooled P6 (two-stage detectors), RetinaNet's P6 and P7,
#: or none (semantic segmentation: P2..P5 only, as the release's FPN with 4 outputs).
TOP_BLOCKS = ("maxpool", "p6p7", "none")


class LastLevelP6P7(fpn.LastLevelP6P7):
    """
    RetinaNet's P6 and P7 from the top input feature: P6 = conv(x), P7 = conv(relu(P6)) as in
    Detectron2, or conv(P6) without the ReLU as in the release (MMDetection's FPN).
    """

    def __init__(self, in_channels: int, out_channels: int, in_feature: str, relu_before_p7: bool):
        super().__init__(in_channels, out_channels, in_feature)
        self.relu_before_p7 = relu_before_p7

    def forward(self, x):
        p6 = self.p6(x)
        return [p6, self.p7(F.relu(p6) if self.relu_before_p7 else p6)]


class SizeMatchingFPN(FPN):
    """
    Detectron2's FPN whose top-down path upsamples each level to the size of the next finer one
    (nearest), as MMSegmentation's FPN does, instead of doubling it. The two agree when each level is
    half the next; on inputs whose sides are not multiples of the top stride (a whole image, or a
    window smaller than the crop size, run unpadded as the release runs it) only this one works.
    """

    def forward(self, x):
        bottom_up_features = self.bottom_up(x)
        prev_features = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results = [self.output_convs[0](prev_features)]
        for lateral_conv, output_conv, name in zip(
            self.lateral_convs[1:], self.output_convs[1:], self.in_features[-2::-1]
        ):
            lateral_features = lateral_conv(bottom_up_features[name])
            prev_features = lateral_features + F.interpolate(
                prev_features, size=lateral_features.shape[-2:], mode="nearest"
            )
            if self._fuse_type == "avg":
                prev_features = prev_features / 2
            results.insert(0, output_conv(prev_features))
        return dict(zip(self._out_features, results))


def build_fpn(cfg, bottom_up: Backbone, top: str) -> FPN:
    """
    Detectron2's FPN on MODEL.FPN.IN_FEATURES of ``bottom_up``, with ``top`` (:data:`TOP_BLOCKS`): a
    max-pooled P6 for two-stage detectors, RetinaNet's P6/P7 computed from the top input feature
    (score maps included), or nothing for semantic segmentation (then a :class:`SizeMatchingFPN`).
    """
    in_features = cfg.MODEL.FPN.IN_FEATURES
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if top == "p6p7":
        top_block = LastLevelP6P7(
            bottom_up.output_shape()[in_features[-1]].channels, out_channels, in_features[-1],
            cfg.MODEL.FPN.RELU_BEFORE_P7,
        )
    elif top == "maxpool":
        top_block = LastLevelMaxPool()
    elif top == "none":  # semantic segmentation, which runs windows of any size
        return SizeMatchingFPN(
            bottom_up=bottom_up,
            in_features=in_features,
            out_channels=out_channels,
            norm=cfg.MODEL.FPN.NORM,
            fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        )
    else:
        raise ValueError(f"FPN top block must be one of {TOP_BLOCKS}, got {top!r}")
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_clip_fpn_backbone(cfg, input_shape: ShapeSpec):
    """CLIP-FPN for two-stage detectors: P2..P5 from res2..res5 and a max-pooled P6."""
    return with_language_guidance(cfg, CLIPResNet(cfg, input_shape), lambda x: build_fpn(cfg, x, "maxpool"))


@BACKBONE_REGISTRY.register()
def build_retinanet_clip_fpn_backbone(cfg, input_shape: ShapeSpec):
    """CLIP-FPN for RetinaNet: P3..P5 from res3..res5, P6 and P7 from res5 (score maps included)."""
    return with_language_guidance(cfg, CLIPResNet(cfg, input_shape), lambda x: build_fpn(cfg, x, "p6p7"))


def attention_pooled_bottom_up(cfg, input_shape: ShapeSpec) -> Backbone:
    """MODEL.DENSECLIP.BOTTOM_UP from the registry; for DenseCLIP detectors with a new attention pool on
    its top feature, giving embeddings of the text encoder's width (MODEL.CLIP.EMBED_DIM)."""
    bottom_up = BACKBONE_REGISTRY.get(cfg.MODEL.DENSECLIP.BOTTOM_UP)(cfg, input_shape)
    if not cfg.MODEL.DENSECLIP.LANGUAGE_GUIDED:
        return bottom_up
    shapes = bottom_up.output_shape()
    top = max(shapes, key=lambda name: shapes[name].stride)
    grid = cfg.MODEL.CLIP.INPUT_RESOLUTION // shapes[top].stride
    return AttentionPooledBackbone(
        bottom_up, top, cfg.MODEL.CLIP.EMBED_DIM, cfg.MODEL.DENSECLIP.ATTENTION_POOL_HEADS, grid,
        cfg.MODEL.CLIP.ATTENTION_POOL_GRID,
    )


@BACKBONE_REGISTRY.register()
def build_attention_pool_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN (P2..P6) on any Detectron2 bottom-up (MODEL.DENSECLIP.BOTTOM_UP), language-guided through a
    new attention pool for DenseCLIP detectors: DenseCLIP on any backbone."""
    bottom_up = attention_pooled_bottom_up(cfg, input_shape)
    return with_language_guidance(cfg, bottom_up, lambda x: build_fpn(cfg, x, "maxpool"))


@BACKBONE_REGISTRY.register()
def build_retinanet_attention_pool_fpn_backbone(cfg, input_shape: ShapeSpec):
    """RetinaNet's FPN (P3..P7) on any Detectron2 bottom-up, as build_attention_pool_fpn_backbone."""
    bottom_up = attention_pooled_bottom_up(cfg, input_shape)
    return with_language_guidance(cfg, bottom_up, lambda x: build_fpn(cfg, x, "p6p7"))


@BACKBONE_REGISTRY.register()
def build_semantic_clip_fpn_backbone(cfg, input_shape: ShapeSpec):
    """CLIP-FPN for semantic segmentation: P2..P5 from res2..res5, no extra level."""
    return with_language_guidance(cfg, CLIPResNet(cfg, input_shape), lambda x: build_fpn(cfg, x, "none"))


@BACKBONE_REGISTRY.register()
def build_semantic_attention_pool_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN (P2..P5) on any Detectron2 bottom-up for semantic segmentation, as build_attention_pool_fpn_backbone."""
    bottom_up = attention_pooled_bottom_up(cfg, input_shape)
    return with_language_guidance(cfg, bottom_up, lambda x: build_fpn(cfg, x, "none"))
