from .denseclip_detector import DenseCLIPDetectorMixin, capture_score_map
from .rcnn import DenseCLIPRCNN
from .retinanet import DenseCLIPRetinaNet
