from .backbone import *  # noqa: F401,F403  (registers the CLIP backbones)
from .context_decoder import ContextDecoder
from .meta_arch import DenseCLIPRCNN, DenseCLIPRetinaNet, capture_score_map
from .score_map import SCORE_MAP_KEY, PixelTextScoreMap
from .score_map_loss import ScoreMapLoss
from .text_encoder import ContextTextEncoder, tokenize_class_names
