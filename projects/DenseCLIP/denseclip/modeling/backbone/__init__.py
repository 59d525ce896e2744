from .attention_pool import AttentionPooledBackbone, dense_attention_pool, resize_positional_grid
from .clip_resnet import CLIPResNet, build_clip_resnet_backbone
from .clip_vit import (
    CLIPSimpleFeaturePyramid,
    CLIPVisionTransformer,
    build_clip_vit_sfp_backbone,
    build_retinanet_clip_vit_sfp_backbone,
)
from .clip_vit_pyramid import CLIPViTFeaturePyramid, build_semantic_clip_vit_fpn_backbone
from .fpn import (
    LastLevelP6P7,
    build_clip_fpn_backbone,
    build_retinanet_clip_fpn_backbone,
    build_semantic_attention_pool_fpn_backbone,
    build_semantic_clip_fpn_backbone,
)
from .language_guided import LanguageGuidedBackbone, LanguageGuidedFeatures
