"""Single-image inference that can also return DenseCLIP's pixel-text score maps."""
from typing import Optional, Tuple

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from ..checkpoint import DenseCLIPCheckpointer
from ..modeling import capture_score_map
from ..utils.visualization import score_map_to_image

__all__ = ["DenseCLIPPredictor"]


class DenseCLIPPredictor(DefaultPredictor):
    """
    Detectron2's DefaultPredictor (BGR image in, predictions out), loading weights with
    DenseCLIPCheckpointer, plus :meth:`predict_with_score_maps`.
    """

    def __init__(self, cfg):
        # DefaultPredictor.__init__ with DenseCLIP's checkpointer (clear errors, CLIP files).
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        DenseCLIPCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")

    def predict_with_score_maps(self, image_bgr: np.ndarray) -> Tuple[dict, Optional[torch.Tensor]]:
        """
        Returns:
            the model's predictions for the image, and its K x H x W per-class score-map
            probabilities aligned with the image (None for models without score maps).
        """
        with capture_score_map(self.model.backbone) as captured:
            predictions = self(image_bgr)
        if "score_map" not in captured:
            return predictions, None
        height, width = image_bgr.shape[:2]
        resized = T.ResizeShortestEdge.get_output_shape(
            height, width, self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST
        )
        probabilities = score_map_to_image(
            captured["score_map"][0], captured["image_size"], resized, (height, width)
        )
        return predictions, probabilities
