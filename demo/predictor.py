"""Visualization on top of DenseCLIPPredictor for demo.py: detections, masks and score-map heatmaps."""
from typing import Iterator, Optional, Sequence, Tuple

import cv2
import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image

from denseclip.engine import DenseCLIPPredictor
from denseclip.utils.visualization import render_prediction


def read_image_bgr(path: str, name: Optional[str] = None) -> np.ndarray:
    """The image at ``path`` as BGR (EXIF orientation applied); an unreadable file is a ValueError naming
    it (``name``, e.g. an upload's own file name, else ``path``)."""
    try:
        return read_image(path, format="BGR")
    except Exception as e:
        reason = str(e).replace(path, name) if name else str(e)
        raise ValueError(f"Cannot read {name or path} as an image: {reason}") from e


class VisualizationDemo:
    def __init__(
        self,
        cfg,
        confidence_threshold: float = 0.5,
        score_maps: bool = False,
        vocabulary: Optional[Sequence[str]] = None,
    ):
        """Score maps (of the detector's classes, or of ``vocabulary``) need a DenseCLIP model. Weights
        trained with another config are refused."""
        self.predictor = DenseCLIPPredictor(cfg, score_maps=score_maps, vocabulary=vocabulary, complete_weights=True)
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused")
        self.confidence_threshold = confidence_threshold
        self.score_map_names = self.predictor.score_map_names if score_maps or vocabulary else None

    def run_on_image(self, image_bgr: np.ndarray) -> Tuple[dict, np.ndarray, Optional[np.ndarray]]:
        """Returns predictions, the BGR overlay, and (with score maps) the BGR heatmap panel."""
        predictions = self.predictor(image_bgr)
        overlay, panel = render_prediction(
            image_bgr, predictions, self.metadata, self.score_map_names, self.confidence_threshold
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
