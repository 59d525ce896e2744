from .clip_fpn import (
    CLIPFPN,
    LanguageGuidedCLIPResNet,
    build_clip_fpn_backbone,
    build_retinanet_clip_fpn_backbone,
    resolve_class_names,
)
from .clip_resnet import CLIPResNet, build_clip_resnet_backbone, dense_attention_pool
