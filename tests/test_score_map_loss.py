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


def test_targets_by_hand():
    # 32 x 32 image, stride 4 -> 8 x 8 cells; a box touches every cell it overlaps.
    inst = instances([[0, 0, 8, 8], [6, 6, 9, 9]], [1, 0])
    targets, covered = score_map_targets([inst], num_classes=2, height=8, width=8, stride=4)
    class1 = {(0, 0), (0, 1), (1, 0), (1, 1)}
    class0 = {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert {tuple(i) for i in targets[0, 1].nonzero().tolist()} == class1
    assert {tuple(i) for i in targets[0, 0].nonzero().tolist()} == class0
    assert {tuple(i) for i in covered[0, 0].nonzero().tolist()} == class0 | class1


def test_loss_by_hand_and_empty_image_contributes_nothing():
    # Image 0: constant logits a (class 0), b (class 1) on 7 covered cells; image 1 has no boxes.
    a, b = 0.5, -1.0
    score_map = torch.tensor([a, b, 3.0, -3.0]).view(2, 2, 1, 1).requires_grad_()
    batch = [instances([[0, 0, 8, 8], [6, 6, 9, 9]], [1, 0]), instances([], [])]
    loss = ScoreMapLoss(weight=2.0, stride=4)(score_map, batch, image_size=(32, 32))
    expected = (4 * bce(a, 1) + 3 * bce(a, 0) + 4 * bce(b, 1) + 3 * bce(b, 0)) / 14
    assert loss.item() == pytest.approx(2.0 * expected, rel=1e-6)
    loss.backward()
    assert torch.all(score_map.grad[1] == 0)  # the empty image gets no gradient


def test_no_boxes_anywhere_gives_zero_not_nan():
    score_map = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss = ScoreMapLoss()(score_map, [instances([], []), instances([], [])], image_size=(64, 64))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(score_map.grad).all()


def test_mask_targets_follow_the_mask_not_the_box():
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 0:4, 0:4] = True  # top-left cell only
    mask[0, 28:32, 28:32] = True  # bottom-right cell only; the box spans the whole image
    inst = instances([[0, 0, 32, 32]], [0], masks=mask)
    box_targets, _ = score_map_targets([inst], 1, 8, 8, 4, use_masks=False)
    mask_targets, covered = score_map_targets([inst], 1, 8, 8, 4, use_masks=True)
    assert box_targets.sum() == 64
    assert mask_targets.sum() == 2 and mask_targets[0, 0, 0, 0] == 1 and mask_targets[0, 0, 7, 7] == 1
    assert torch.equal(covered.float(), mask_targets)
