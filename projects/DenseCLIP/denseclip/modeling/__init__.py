from .backbone import *  # noqa: F401,F403  (registers the CLIP backbones)
from .context_decoder import ContextDecoder
from .score_map import SCORE_MAP_KEY, PixelTextScoreMap
from .text_encoder import ContextTextEncoder, tokenize_class_names
