"""CLIP-FPN backbones: Detectron2's FPN on the CLIP ResNet, language-guided for DenseCLIP detectors."""
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone import fpn
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from .attention_pool import AttentionPooledBackbone
from .clip_resnet import CLIPResNet
from .language_guided import is_language_guided, with_language_guidance

__all__ = [
    "LastLevelP6P7",
    "build_attention_pool_fpn_backbone",
    "build_clip_fpn_backbone",
    "build_fpn",
    "build_retinanet_attention_pool_fpn_backbone",
    "build_retinanet_clip_fpn_backbone",
]


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


def build_fpn(cfg, bottom_up: Backbone, retinanet: bool) -> FPN:
    """
    Detectron2's FPN on MODEL.FPN.IN_FEATURES of ``bottom_up``: with a max-pooled P6 for two-stage
    detectors, or RetinaNet's P6/P7 computed from the top input feature (score maps included).
    """
    in_features = cfg.MODEL.FPN.IN_FEATURES
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if retinanet:
        top = in_features[-1]
        top_block = LastLevelP6P7(
            bottom_up.output_shape()[top].channels, out_channels, top, cfg.MODEL.FPN.RELU_BEFORE_P7
        )
    else:
        top_block = LastLevelMaxPool()
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
    return with_language_guidance(cfg, CLIPResNet(cfg, input_shape), lambda x: build_fpn(cfg, x, retinanet=False))


@BACKBONE_REGISTRY.register()
def build_retinanet_clip_fpn_backbone(cfg, input_shape: ShapeSpec):
    """CLIP-FPN for RetinaNet: P3..P5 from res3..res5, P6 and P7 from res5 (score maps included)."""
    return with_language_guidance(cfg, CLIPResNet(cfg, input_shape), lambda x: build_fpn(cfg, x, retinanet=True))


def attention_pooled_bottom_up(cfg, input_shape: ShapeSpec) -> Backbone:
    """MODEL.DENSECLIP.BOTTOM_UP from the registry; for DenseCLIP detectors with a new attention pool on
    its top feature, giving embeddings of the text encoder's width (MODEL.CLIP.EMBED_DIM)."""
    bottom_up = BACKBONE_REGISTRY.get(cfg.MODEL.DENSECLIP.BOTTOM_UP)(cfg, input_shape)
    if not is_language_guided(cfg):
        return bottom_up
    shapes = bottom_up.output_shape()
    top = max(shapes, key=lambda name: shapes[name].stride)
    grid = cfg.MODEL.CLIP.INPUT_RESOLUTION // shapes[top].stride
    return AttentionPooledBackbone(bottom_up, top, cfg.MODEL.CLIP.EMBED_DIM, cfg.MODEL.DENSECLIP.ATTENTION_POOL_HEADS, grid)


@BACKBONE_REGISTRY.register()
def build_attention_pool_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN (P2..P6) on any Detectron2 bottom-up (MODEL.DENSECLIP.BOTTOM_UP), language-guided through a
    new attention pool for DenseCLIP detectors: DenseCLIP on any backbone."""
    bottom_up = attention_pooled_bottom_up(cfg, input_shape)
    return with_language_guidance(cfg, bottom_up, lambda x: build_fpn(cfg, x, retinanet=False))


@BACKBONE_REGISTRY.register()
def build_retinanet_attention_pool_fpn_backbone(cfg, input_shape: ShapeSpec):
    """RetinaNet's FPN (P3..P7) on any Detectron2 bottom-up, as build_attention_pool_fpn_backbone."""
    bottom_up = attention_pooled_bottom_up(cfg, input_shape)
    return with_language_guidance(cfg, bottom_up, lambda x: build_fpn(cfg, x, retinanet=True))
