from .denseclip import DenseCLIPDetector
from .rcnn import DenseCLIPRCNN
from .retinanet import DenseCLIPRetinaNet
