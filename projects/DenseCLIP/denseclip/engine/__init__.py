from .predictor import DenseCLIPPredictor
from .trainer import DenseCLIPTrainer, check_class_count
