"""Pictures of what DenseCLIP predicts: detections or label maps drawn with Detectron2's Visualizer, and
each class's pixel-text score map as a heatmap beside its image."""
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import _OFF_WHITE, ColorMode, Visualizer

__all__ = [
    "colour_bar", "draw_instances", "draw_sem_seg", "enlarge", "grid_columns", "heatmap", "render_prediction",
    "score_map_panel", "score_map_probabilities",
]


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


_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BACKGROUND = 255  # the panel's page colour (white): between tiles, under captions and the colour bar
_GAP = 4  # pixels between tiles
_MIN_FONT_SCALE = 0.35  # below this OpenCV's font stops being legible; longer captions are shortened


def _text_strip(text: str, width: int, height: int, suffix: str = "") -> np.ndarray:
    """A white ``height`` x ``width`` RGB strip with ``text + suffix`` in black, scaled to fit its
    width; where even the smallest legible size does not fit, ``text`` is shortened with '...'."""
    strip = np.full((height, width, 3), _BACKGROUND, np.uint8)
    thickness = 1
    scale = 0.6 * height / cv2.getTextSize("Ag", _FONT, 1.0, thickness)[0][1]
    fits = lambda text, scale: cv2.getTextSize(text, _FONT, scale, thickness)[0][0] <= width - 6  # noqa: E731
    while not fits(text + suffix, scale) and scale > _MIN_FONT_SCALE:
        scale = max(0.95 * scale, _MIN_FONT_SCALE)
    while not fits(text + suffix, scale) and len(text) > 4:
        text = text[: -4 if text.endswith("...") else -1].rstrip() + "..."
    text += suffix
    (_, text_height), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    cv2.putText(strip, text, (3, (height + text_height) // 2), _FONT, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return strip


def grid_columns(num_tiles: int, max_columns: int) -> int:
    """Columns for ``num_tiles`` tiles: all in one row when they fit, else the count up to
    ``max_columns`` that leaves the fewest empty places in the last row (the most columns among equals)."""
    if num_tiles <= max_columns:
        return num_tiles
    return min(range(2, max_columns + 1), key=lambda c: (-num_tiles % c, -c))


def colour_bar(width: int, height: int, title: str = "sigmoid(score)") -> np.ndarray:
    """A white strip with the JET colour scale from probability 0 (left) to 1 (right), its ticks and
    ``title`` (what the probability is)."""
    strip = np.full((height, width, 3), _BACKGROUND, np.uint8)
    title = _text_strip(title, width // 4, height // 2)
    strip[: height // 2, : width // 4] = title
    left, right = width // 4 + 8, width - 16
    ramp = np.linspace(0, 255, right - left).round().astype(np.uint8)[None]
    bar = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    strip[4 : height // 2, left:right] = bar
    scale = 0.45 * (height // 2) / cv2.getTextSize("0", _FONT, 1.0, 1)[0][1]
    for value, label in ((0.0, "0"), (0.5, "0.5"), (1.0, "1")):
        x = left + int(round(value * (right - left - 1)))
        (w, h), _ = cv2.getTextSize(label, _FONT, scale, 1)
        cv2.line(strip, (x, height // 2), (x, height // 2 + 3), (0, 0, 0), 1)
        cv2.putText(strip, label, (min(max(x - w // 2, 0), width - w), height // 2 + 6 + h), _FONT, scale,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def _class_colours(metadata) -> List[List[int]]:
    """RGB 0-255 colour per stuff class: the metadata's stuff_colors, else Detectron2's colormap in order."""
    colours = metadata.get("stuff_colors", None)
    if colours:
        return [list(c) for c in colours]
    palette = colormap(rgb=True, maximum=255)
    return [palette[i % len(palette)].astype(int).tolist() for i in range(len(metadata.stuff_classes))]


def _legend(names: Sequence[str], colours: Sequence[Sequence[int]], width: int, cell: int = 170) -> np.ndarray:
    """RGB strip ``width`` wide: a colour swatch and the name of each class, in rows of width // cell."""
    columns = max(1, width // cell)
    rows = -(-len(names) // columns)
    line = 28
    strip = np.full((rows * line + 6, width, 3), 255, np.uint8)
    for i, (name, colour) in enumerate(zip(names, colours)):
        x, y = (i % columns) * cell + 6, (i // columns) * line + 6
        cv2.rectangle(strip, (x, y), (x + 20, y + 20), tuple(int(c) for c in colour), -1)
        cv2.rectangle(strip, (x, y), (x + 20, y + 20), (0, 0, 0), 1)
        cv2.putText(strip, name, (x + 26, y + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def draw_sem_seg(image_rgb: np.ndarray, labels: np.ndarray, metadata, min_side: int = 512) -> np.ndarray:
    """
    RGB picture of a label map: each class's pixels coloured over the image with their outlines
    (Detectron2's Visualizer), enlarged so that its shorter side is at least ``min_side``, with a
    legend of every class's colour below (no names on the regions: a large class's name would land
    on whatever lies at its centre).

    Args:
        labels: H x W class indices into ``metadata.stuff_classes`` (others are not drawn).
    """
    names = list(metadata.stuff_classes)
    colours = _class_colours(metadata)
    scale = max(1.0, min_side / min(image_rgb.shape[:2]))
    visualizer = Visualizer(image_rgb, scale=scale)
    for label in np.unique(labels):
        if 0 <= label < len(names):
            visualizer.draw_binary_mask((labels == label).astype(np.uint8), color=np.array(colours[label]) / 255,
                                        edge_color=_OFF_WHITE, alpha=0.6, area_threshold=0)
    drawn = visualizer.output.get_image()
    return np.concatenate([drawn, _legend(names, colours, drawn.shape[1])], axis=0)


def enlarge(image_rgb: np.ndarray, min_side: int) -> np.ndarray:
    """The image resized (bilinear) so that its shorter side is at least ``min_side``; unchanged if it is."""
    height, width = image_rgb.shape[:2]
    scale = max(1.0, min_side / min(height, width))
    size = (int(round(width * scale)), int(round(height * scale)))
    return cv2.resize(image_rgb, size, interpolation=cv2.INTER_LINEAR) if scale > 1 else image_rgb.copy()


def heatmap(base_rgb: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """One score map's probabilities (H' x W' in [0, 1], any size) in JET colours over ``base_rgb``
    (resized to it): the tiles of :func:`score_map_panel`."""
    size = (base_rgb.shape[1], base_rgb.shape[0])
    heat = cv2.resize((np.asarray(probability) * 255).round().astype(np.uint8), size, interpolation=cv2.INTER_LINEAR)
    heat = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(base_rgb, 0.4, heat, 0.6, 0)


def score_map_panel(
    image_rgb: np.ndarray,
    probabilities: torch.Tensor,
    class_names: Sequence[str],
    min_tile: int = 256,
    columns: int = 4,
    probability_name: str = "sigmoid(score)",
) -> np.ndarray:
    """
    The image followed by one heatmap per name (JET colours over the image), each under its caption
    (the name and the map's maximum), in a grid of at most ``columns`` columns chosen to leave the
    fewest empty places, above a colour bar. Works for any K maps (detection classes, segmentation
    classes, a vocabulary).

    Args:
        image_rgb: H x W x 3 uint8.
        probabilities: K x H x W in [0, 1].
        class_names: K names.
        probability_name: how ``probabilities`` were computed, the colour bar's title.
    Returns:
        RGB uint8 picture. Tiles are the image enlarged so that its shorter side is at least
        ``min_tile`` (labels stay legible on small images).
    """
    if len(class_names) != len(probabilities):
        raise ValueError(f"{len(probabilities)} score maps but {len(class_names)} names")
    base = enlarge(image_rgb, min_tile)
    size = (base.shape[1], base.shape[0])
    tiles = [("image", "", base)]
    for name, probability in zip(class_names, probabilities.numpy()):
        tiles.append((name, f" (max {probability.max():.2f})", heatmap(base, probability)))
    caption = max(18, size[0] // 10)
    num_columns = grid_columns(len(tiles), columns)
    num_rows = -(-len(tiles) // num_columns)
    cell_w, cell_h = size[0] + _GAP, caption + size[1] + _GAP
    bar_height = max(36, 2 * caption)
    panel = np.full((num_rows * cell_h + bar_height, num_columns * cell_w - _GAP, 3), _BACKGROUND, np.uint8)
    for index, (text, suffix, tile) in enumerate(tiles):
        y, x = (index // num_columns) * cell_h, (index % num_columns) * cell_w
        panel[y : y + caption, x : x + size[0]] = _text_strip(text, size[0], caption, suffix)
        panel[y + caption : y + caption + size[1], x : x + size[0]] = tile
    panel[num_rows * cell_h :] = colour_bar(panel.shape[1], bar_height, probability_name)
    return panel


def render_prediction(
    image_bgr: np.ndarray,
    predictions: dict,
    metadata,
    score_map_names: Optional[Sequence[str]] = None,
    score_threshold: float = 0.5,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """
    BGR pictures of one prediction (a model's output for the image): the detections (or, for a
    semantic segmentor's "sem_seg" logits, the label map) drawn on the image, and, given
    ``score_map_names`` (the names of the output's "score_maps"), the panel of the score maps'
    probabilities (else None, see :func:`score_map_probabilities`).
    """
    image_rgb = image_bgr[:, :, ::-1]
    semantic = "sem_seg" in predictions
    if semantic:
        labels = predictions["sem_seg"].argmax(dim=0).cpu().numpy()
        overlay = draw_sem_seg(image_rgb, labels, metadata)[:, :, ::-1]
    else:
        overlay = draw_instances(image_rgb, predictions["instances"], metadata, score_threshold)[:, :, ::-1]
    if score_map_names is None:
        return overlay, None
    probabilities, name = score_map_probabilities(predictions)
    return overlay, score_map_panel(image_rgb, probabilities, score_map_names, probability_name=name)[:, :, ::-1]


def score_map_probabilities(predictions: dict) -> Tuple[torch.Tensor, str]:
    """
    The K x H x W probabilities of a prediction's "score_maps" (float32, CPU) and how they were made:
    per-name sigmoids for detectors, whose auxiliary loss scores each class on its own; a softmax over
    the names for semantic segmentors (a "sem_seg" output), whose auxiliary loss is a cross-entropy.
    """
    score_maps = predictions["score_maps"].float().cpu()
    if "sem_seg" in predictions:
        return score_maps.softmax(dim=0), "softmax(score)"
    return score_maps.sigmoid(), "sigmoid(score)"
