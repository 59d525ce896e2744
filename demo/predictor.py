"""Visualization on top of DenseCLIPPredictor for demo.py: detections, masks and score-map heatmaps."""
from typing import Iterator, Optional, Tuple

import cv2
import numpy as np

from detectron2.data import MetadataCatalog

from denseclip.engine import DenseCLIPPredictor
from denseclip.utils.visualization import render_prediction


class VisualizationDemo:
    def __init__(self, cfg, confidence_threshold: float = 0.5, score_maps: bool = False):
        self.predictor = DenseCLIPPredictor(cfg)
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused")
        self.confidence_threshold = confidence_threshold
        self.score_maps = score_maps
        names = getattr(self.predictor.model.backbone, "class_names", None)
        if score_maps and names is None:
            raise ValueError("--score-maps needs a DenseCLIP model; this config builds the CLIP baseline")
        self.class_names = names

    def run_on_image(self, image_bgr: np.ndarray) -> Tuple[dict, np.ndarray, Optional[np.ndarray]]:
        """Returns predictions, the BGR overlay, and (with score maps) the BGR heatmap panel."""
        predictions, probabilities = self.predictor.predict_with_score_maps(image_bgr)
        overlay, panel = render_prediction(
            image_bgr, predictions, probabilities if self.score_maps else None, self.metadata,
            self.class_names, self.confidence_threshold,
        )
        return predictions, overlay, panel

    def run_on_video(self, video: cv2.VideoCapture) -> Iterator[np.ndarray]:
        """BGR overlays of each frame (with the score-map panel below it when requested)."""
        while video.isOpened():
            ok, frame = video.read()
            if not ok:
                break
            _, overlay, panel = self.run_on_image(frame)
            if panel is not None:
                panel = cv2.resize(panel, (overlay.shape[1], int(panel.shape[0] * overlay.shape[1] / panel.shape[1])))
                overlay = np.concatenate([overlay, panel], axis=0)
            yield overlay
