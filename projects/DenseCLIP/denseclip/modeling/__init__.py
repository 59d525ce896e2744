from . import backbone  # noqa: F401  (registers the CLIP backbones)
from .backbone import (
    CLIPResNet,
    CLIPVisionTransformer,
    CLIPViTFeaturePyramid,
    LanguageGuidedBackbone,
    LanguageGuidedFeatures,
    build_clip_fpn_backbone,
    build_clip_vit_sfp_backbone,
    build_retinanet_clip_fpn_backbone,
    build_retinanet_clip_vit_sfp_backbone,
)
from .context_decoder import ContextDecoder
from .meta_arch import (
    DenseCLIPDetector,
    DenseCLIPModel,
    DenseCLIPRCNN,
    DenseCLIPRetinaNet,
    DenseCLIPSemanticSegmentor,
    SlidingWindowSemanticSegmentor,
)
from .score_map import FrozenTextEmbeddings, PixelTextScoreMap
from .score_map_loss import ScoreMapLoss
from .sem_seg_head import SemanticFPNHead, label_map_cross_entropy
from .task import Task, head_num_classes, task_of
from .text_encoder import ContextTextEncoder, Vocabulary, parse_vocabulary, tokenize_class_names
