import math

import pytest
import torch

from detectron2.structures import BitMasks, Boxes, Instances

from denseclip.modeling import ScoreMapLoss
from denseclip.modeling.score_map_loss import score_map_targets


def instances(boxes, classes, image_size=(32, 32), masks=None):
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if masks is not None:
        inst.gt_masks = BitMasks(masks)
    return inst


def bce(logit, target):
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def cells_of(targets):
    return {tuple(i) for i in targets.nonzero().tolist()}


# The release's rule (cells floor(x1 / 4) .. floor(x2 / 4) - 1, likewise in y, each bound clamped to
# 0 .. 7 first) worked by hand on an 8 x 8 grid of 4 px cells: (box, covered rows, covered columns).
@pytest.mark.parametrize(
    "box, rows, cols",
    [
        ([0, 0, 8, 8], range(0, 2), range(0, 2)),  # aligned with the grid: x 0/4=0 .. 8/4=2
        ([5, 5, 7, 7], range(0), range(0)),  # inside cell (1, 1): floor 1 .. 1, covers none
        ([3, 1, 9, 6], range(0, 1), range(0, 2)),  # x 0 .. 2, y 0 .. 1
        ([6.5, 2.2, 13.9, 30.1], range(0, 7), range(1, 3)),  # x 1 .. 3, y 0 .. 7
        ([20, 24, 32, 32], range(6, 7), range(5, 7)),  # x 5 .. 8->7, y 6 .. 8->7: last row/column out
        ([0, 0, 32, 32], range(0, 7), range(0, 7)),  # the whole image: 7 x 7 cells
        ([29, 0, 32, 3], range(0), range(0)),  # x 7 .. 8->7, y 0 .. 0: none
    ],
)
def test_box_targets_follow_the_release_rule(box, rows, cols):
    inst = instances([box], [1])
    targets, covered = score_map_targets([inst], num_classes=2, height=8, width=8, stride=4, target="box")
    expected = {(y, x) for y in rows for x in cols}
    assert cells_of(targets[0, 1]) == expected
    assert cells_of(targets[0, 0]) == set()
    assert cells_of(covered[0, 0]) == expected


def test_box_overlap_targets_cover_every_overlapped_cell():
    # 32 x 32 image, stride 4 -> 8 x 8 cells.
    inst = instances([[0, 0, 8, 8], [6, 6, 9, 9], [5, 5, 7, 7]], [1, 0, 0])
    targets, covered = score_map_targets([inst], num_classes=2, height=8, width=8, stride=4, target="box_overlap")
    class1 = {(0, 0), (0, 1), (1, 0), (1, 1)}
    class0 = {(1, 1), (1, 2), (2, 1), (2, 2)}  # the box inside cell (1, 1) is kept
    assert cells_of(targets[0, 1]) == class1
    assert cells_of(targets[0, 0]) == class0
    assert cells_of(covered[0, 0]) == class0 | class1


def test_loss_by_hand_and_empty_image_contributes_nothing():
    # Image 0: constant logits a (class 0), b (class 1); class 1 covers 2 x 2 cells, class 0 covers
    # 3 x 2 (rows 1-3, columns 1-2), one cell shared, so 9 cells count; image 1 has no boxes.
    a, b = 0.5, -1.0
    score_map = torch.tensor([a, b, 3.0, -3.0]).view(2, 2, 1, 1).requires_grad_()
    batch = [instances([[0, 0, 8, 8], [4, 4, 12, 16]], [1, 0]), instances([], [])]
    loss = ScoreMapLoss(weight=2.0, stride=4, target="box")(score_map, batch, image_size=(32, 32))
    expected = (6 * bce(a, 1) + 3 * bce(a, 0) + 4 * bce(b, 1) + 5 * bce(b, 0)) / 18
    assert loss.item() == pytest.approx(2.0 * expected, rel=1e-6)
    loss.backward()
    assert torch.all(score_map.grad[1] == 0)  # the empty image gets no gradient


def test_no_boxes_anywhere_gives_zero_not_nan():
    score_map = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss = ScoreMapLoss(weight=1.0, stride=4, target="box")(score_map, [instances([], []), instances([], [])], image_size=(64, 64))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(score_map.grad).all()


def test_mask_targets_follow_the_mask_not_the_box():
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 0:4, 0:4] = True  # top-left cell only
    mask[0, 28:32, 28:32] = True  # bottom-right cell only; the box spans the whole image
    inst = instances([[0, 0, 32, 32]], [0], masks=mask)
    box_targets, _ = score_map_targets([inst], 1, 8, 8, 4, target="box")
    mask_targets, covered = score_map_targets([inst], 1, 8, 8, 4, target="mask")
    assert box_targets.sum() == 49  # the release's rule clamps out the last row and column
    assert mask_targets.sum() == 2 and mask_targets[0, 0, 0, 0] == 1 and mask_targets[0, 0, 7, 7] == 1
    assert torch.equal(covered.float(), mask_targets)
