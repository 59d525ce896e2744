"""The score-map picture: a grid without empty black tiles, the image unobstructed, a colour bar."""
import cv2
import numpy as np
import pytest
import torch

from denseclip.utils.visualization import grid_columns, score_map_panel

# (tiles, at most this many columns): columns, by the rule "one row if they fit, else the fewest empty
# places in the last row, then the most columns".
GRIDS = [((1, 4), 1), ((4, 4), 4), ((6, 4), 3), ((8, 4), 4), ((5, 4), 3), ((7, 4), 4), ((81, 4), 3), ((151, 6), 4)]


@pytest.mark.parametrize("given,columns", GRIDS)
def test_grid_columns(given, columns):
    assert grid_columns(*given) == columns


JET = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], cv2.COLORMAP_JET)[0, :, ::-1].astype(int)  # RGB


def jet_index(pixels):
    """The JET colour-map entry nearest to each RGB pixel (N x 3) and its distance."""
    distance = ((pixels[:, None, :].astype(int) - JET[None]) ** 2).sum(-1)
    return distance.argmin(1), distance.min(1)


def image_and_maps(num_maps, size=96):
    image = np.full((size, size, 3), 60, np.uint8)
    cv2.circle(image, (30, 40), 20, (230, 200, 40), -1)
    cv2.rectangle(image, (55, 10), (90, 50), (40, 220, 90), -1)
    probabilities = torch.rand(num_maps, size, size, generator=torch.Generator().manual_seed(0))
    return image, probabilities


@pytest.mark.parametrize("num_maps", [3, 5])
def test_panel_has_no_black_tiles_shows_the_image_and_a_colour_bar(num_maps):
    image, probabilities = image_and_maps(num_maps)
    names = ["circle", "square", "a name much too long to fit above a small tile", "star", "ring"][:num_maps]
    panel = score_map_panel(image, probabilities, names, min_tile=128)
    # no empty black tile: no black square of half a tile anywhere
    black = (panel.max(axis=2) == 0).astype(np.float32)
    assert cv2.boxFilter(black, -1, (64, 64), normalize=True).max() < 1
    # the image, enlarged to the tile size, appears whole: no caption drawn over it
    tile = cv2.resize(image, (128, 128), interpolation=cv2.INTER_LINEAR)
    x, y = cv2.minMaxLoc(cv2.matchTemplate(panel, tile, cv2.TM_SQDIFF))[2]
    assert np.array_equal(panel[y : y + 128, x : x + 128], tile)
    # a colour bar: a row with a run of 150+ pixels going through the JET colours from 0 to 1
    for row in panel[-panel.shape[0] // 5 :]:
        index, distance = jet_index(row)
        on_scale = np.flatnonzero(distance < 30)
        if len(on_scale) > 150 and np.all(np.diff(index[on_scale]) >= 0):
            assert index[on_scale[0]] <= 5 and index[on_scale[-1]] >= 250
            break
    else:
        pytest.fail("no colour bar below the tiles")


def test_names_and_maps_must_match():
    image, probabilities = image_and_maps(3)
    with pytest.raises(ValueError, match="3 score maps but 2 names"):
        score_map_panel(image, probabilities, ["a", "b"])


def test_render_prediction_draws_confident_detections_on_the_bgr_image():
    """A BGR image (blue left half, red right half) with a detection at score 0.9 and one at 0.3: the
    picture is the image enlarged 8x (shorter side 512), BGR, unchanged outside the confident box (and
    its outline's width), where the box is drawn; the 0.3 detection, below the 0.5 threshold, is not."""
    from detectron2.data import MetadataCatalog
    from detectron2.structures import Boxes, Instances

    from denseclip.utils.visualization import render_prediction

    image = np.zeros((64, 96, 3), np.uint8)
    image[:, :48] = (255, 0, 0)  # blue, in BGR
    image[:, 48:] = (0, 0, 255)  # red
    instances = Instances((64, 96))
    instances.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 40.0, 50.0], [50.0, 5.0, 90.0, 60.0]]))
    instances.scores = torch.tensor([0.9, 0.3])
    instances.pred_classes = torch.tensor([0, 1])
    metadata = MetadataCatalog.get("render_prediction_test")
    metadata.thing_classes = ["cat", "dog"]
    overlay, panel = render_prediction(image, {"instances": instances}, metadata)
    assert panel is None and overlay.shape == (512, 768, 3)
    enlarged = image.repeat(8, axis=0).repeat(8, axis=1)
    changed = (overlay != enlarged).any(axis=2)
    outside = np.ones_like(changed)
    outside[80 - 16 : 400 + 16, 80 - 16 : 320 + 16] = False  # the box [10, 10, 40, 50] x 8, with a margin
    assert not changed[outside].any()
    assert changed[100:380, 76:84].mean() > 0.9 and changed[100:380, 316:324].mean() > 0.9  # left, right sides


def test_label_map_picture_colours_each_class_and_has_a_legend():
    """A 64 x 64 map (left half class 0, right half class 1) drawn at 512 px: each half is tinted towards
    its class colour, and the legend strip below shows both colours."""
    from detectron2.data.catalog import Metadata

    from denseclip.utils.visualization import draw_sem_seg

    image = np.full((64, 64, 3), 128, np.uint8)
    labels = np.zeros((64, 64), np.int64)
    labels[:, 32:] = 1
    colours = [[255, 0, 0], [0, 0, 255]]
    picture = draw_sem_seg(image, labels, Metadata(stuff_classes=["left", "right"], stuff_colors=colours))
    assert picture.shape[1] == 512 and picture.shape[0] > 512  # enlarged 8x, legend below
    left, right = picture[200:300, 20:100].reshape(-1, 3).mean(0), picture[200:300, 412:492].reshape(-1, 3).mean(0)
    assert left[0] > left[2] + 50 and right[2] > right[0] + 50
    legend = picture[512:].reshape(-1, 3)
    for colour in colours:
        assert (np.abs(legend.astype(int) - colour).sum(1) == 0).sum() > 100  # a swatch of at least 10 x 10
