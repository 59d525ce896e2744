"""DenseCLIP's auxiliary loss: the pixel-text score map against class maps drawn from the ground truth."""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.structures import BitMasks, Instances, PolygonMasks
from detectron2.utils import comm

__all__ = ["ScoreMapLoss", "score_map_targets"]


def _box_cells(boxes: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """N x height x width: which stride x stride cells each box (x1, y1, x2, y2 in pixels) overlaps."""
    lo = torch.arange(height, device=boxes.device, dtype=boxes.dtype) * stride
    rows = (boxes[:, 1:2] < lo + stride) & (boxes[:, 3:4] > lo)  # N x height
    lo = torch.arange(width, device=boxes.device, dtype=boxes.dtype) * stride
    cols = (boxes[:, 0:1] < lo + stride) & (boxes[:, 2:3] > lo)  # N x width
    return rows[:, :, None] & cols[:, None, :]


def _mask_cells(masks, image_size: Tuple[int, int], height: int, width: int, stride: int) -> torch.Tensor:
    """N x height x width: which stride x stride cells each instance mask touches."""
    if isinstance(masks, PolygonMasks):
        masks = BitMasks.from_polygon_masks(masks, *image_size)
    bitmaps = masks.tensor if isinstance(masks, BitMasks) else masks
    bitmaps = bitmaps[:, : height * stride, : width * stride].float()
    bitmaps = F.pad(bitmaps, (0, width * stride - bitmaps.shape[2], 0, height * stride - bitmaps.shape[1]))
    return F.max_pool2d(bitmaps[:, None], kernel_size=stride)[:, 0] > 0


def score_map_targets(
    instances: List[Instances], num_classes: int, height: int, width: int, stride: int, use_masks: bool = False
):
    """
    Per-class target maps on the stride-``stride`` grid of the padded batch.

    Returns:
        targets: B x K x height x width, 1 where a ground-truth object of class k covers the cell;
        covered: B x 1 x height x width, cells covered by any object (the only cells the loss counts).
    """
    targets, covered = [], []
    for inst in instances:
        if use_masks and inst.has("gt_masks") and len(inst) > 0:
            cells = _mask_cells(inst.gt_masks, inst.image_size, height, width, stride)
        else:
            cells = _box_cells(inst.gt_boxes.tensor, height, width, stride)
        cells = cells.to(torch.float32).flatten(1)  # N x HW
        one_hot = F.one_hot(inst.gt_classes.long(), num_classes).to(torch.float32)  # N x K
        targets.append((one_hot.T @ cells).clamp(max=1).view(num_classes, height, width))
        covered.append((cells.sum(0) > 0).view(1, height, width))
    return torch.stack(targets), torch.stack(covered)


class ScoreMapLoss(nn.Module):
    """
    Binary cross-entropy between sigmoid(score map upsampled to stride ``stride``) and the class maps of
    the ground truth, counted over all K channels of the cells some object covers, averaged over
    those (cell, class) entries of the whole (distributed) batch. No objects anywhere gives 0.
    """

    def __init__(self, weight: float = 1.0, stride: int = 4, use_masks: bool = False):
        super().__init__()
        self.weight = weight
        self.stride = stride
        self.use_masks = use_masks

    @classmethod
    def from_config(cls, cfg):
        loss = cfg.MODEL.DENSECLIP.SCORE_MAP_LOSS
        return cls(weight=loss.WEIGHT, stride=loss.STRIDE, use_masks=loss.USE_MASKS)

    def forward(self, score_map: torch.Tensor, instances: List[Instances], image_size: Tuple[int, int]):
        """
        Args:
            score_map: B x K x h x w logits (stride 32 of the padded batch).
            instances: per image, gt_boxes and gt_classes (and gt_masks with use_masks), in the
                coordinates of the padded batch.
            image_size: (H, W) of the padded batch.
        Returns:
            scalar loss, already multiplied by the loss weight.
        """
        height, width = -(-image_size[0] // self.stride), -(-image_size[1] // self.stride)
        logits = F.interpolate(score_map.float(), size=(height, width), mode="bilinear", align_corners=False)
        targets, covered = score_map_targets(
            instances, score_map.shape[1], height, width, self.stride, self.use_masks
        )
        losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * covered
        # Average over the entries of the whole distributed batch: DDP then averages gradients
        # across processes, so N processes x 1 image equals 1 process x N images.
        count = covered.sum().float() * score_map.shape[1]
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(count)
            count = count / comm.get_world_size()
        return self.weight * losses.sum() / count.clamp(min=1.0)
