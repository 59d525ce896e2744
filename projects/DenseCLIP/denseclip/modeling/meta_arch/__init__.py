from .denseclip import DenseCLIPDetector, DenseCLIPModel
from .rcnn import DenseCLIPRCNN
from .retinanet import DenseCLIPRetinaNet
from .semantic_seg import DenseCLIPSemanticSegmentor, SlidingWindowSemanticSegmentor, sliding_windows
