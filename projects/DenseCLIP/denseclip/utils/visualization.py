"""Pictures of what DenseCLIP predicts: detections drawn with Detectron2's Visualizer, and each class's
pixel-text score map as a heatmap beside its image."""
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["draw_instances", "render_prediction", "score_map_panel"]


def draw_instances(
    image_rgb: np.ndarray, instances, metadata, score_threshold: float = 0.5, min_side: int = 512
) -> np.ndarray:
    """RGB image with the instances above ``score_threshold`` drawn on it, enlarged so that its
    shorter side is at least ``min_side`` (labels stay legible on small images)."""
    instances = instances.to("cpu")
    instances = instances[instances.scores >= score_threshold]
    scale = max(1.0, min_side / min(image_rgb.shape[:2]))
    visualizer = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image()


def _caption(tile: np.ndarray, text: str) -> np.ndarray:
    tile = tile.copy()
    scale = max(tile.shape[1] / 400, 0.4)
    thickness = max(int(round(scale * 2)), 1)
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    cv2.rectangle(tile, (0, 0), (w + 8, h + 10), (0, 0, 0), -1)
    cv2.putText(tile, text, (4, h + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return tile


def score_map_panel(
    image_rgb: np.ndarray,
    probabilities: torch.Tensor,
    class_names: Sequence[str],
    min_tile: int = 256,
    columns: int = 4,
) -> np.ndarray:
    """
    The image followed by one heatmap per class (JET colour map over the image), in a grid.

    Args:
        image_rgb: H x W x 3 uint8.
        probabilities: K x H x W in [0, 1].
    Returns:
        RGB uint8 grid of (K + 1) tiles.
    """
    height, width = image_rgb.shape[:2]
    scale = max(1.0, min_tile / min(height, width))
    size = (int(round(width * scale)), int(round(height * scale)))
    base = cv2.resize(image_rgb, size, interpolation=cv2.INTER_LINEAR)
    tiles = [_caption(base, "image")]
    for name, probability in zip(class_names, probabilities.numpy()):
        heat = cv2.resize((probability * 255).astype(np.uint8), size, interpolation=cv2.INTER_LINEAR)
        heat = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        tiles.append(_caption(cv2.addWeighted(base, 0.4, heat, 0.6, 0), f"{name} (max {probability.max():.2f})"))
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    blank = np.zeros_like(base)
    tiles += [blank] * (rows * columns - len(tiles))
    return np.concatenate(
        [np.concatenate(tiles[r * columns : (r + 1) * columns], axis=1) for r in range(rows)], axis=0
    )


def render_prediction(
    image_bgr: np.ndarray,
    predictions: dict,
    metadata,
    score_map_names: Optional[Sequence[str]] = None,
    score_threshold: float = 0.5,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """
    BGR pictures of one prediction (a model's output for the image): the detections drawn on the
    image, and, given ``score_map_names`` (the names of the output's "score_maps"), the panel of the
    score maps' probabilities (else None).
    """
    image_rgb = image_bgr[:, :, ::-1]
    overlay = draw_instances(image_rgb, predictions["instances"], metadata, score_threshold)[:, :, ::-1]
    if score_map_names is None:
        return overlay, None
    probabilities = predictions["score_maps"].float().sigmoid().cpu()
    return overlay, score_map_panel(image_rgb, probabilities, score_map_names)[:, :, ::-1]
