"""DenseCLIP's auxiliary loss: the pixel-text score map against class maps drawn from the ground truth."""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.structures import BitMasks, Instances, PolygonMasks
from detectron2.utils import comm

__all__ = ["ScoreMapLoss", "score_map_targets"]


def _box_cells_release(boxes: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """
    N x height x width, the release's rule: a box (x1, y1, x2, y2 in pixels) covers the cells
    floor(x1 / stride) .. floor(x2 / stride) - 1 (likewise in y), each bound first clamped to
    0 .. width - 1 (height - 1). A box inside a single cell covers none.
    """
    cells = torch.div(boxes, stride, rounding_mode="floor").long()
    x1, x2 = cells[:, 0::2].clamp(0, width - 1).unbind(1)
    y1, y2 = cells[:, 1::2].clamp(0, height - 1).unbind(1)
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    inside_rows = (rows >= y1[:, None]) & (rows < y2[:, None])  # N x height
    inside_cols = (cols >= x1[:, None]) & (cols < x2[:, None])  # N x width
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def _box_cells_overlap(boxes: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """N x height x width: every stride x stride cell a box (x1, y1, x2, y2 in pixels) overlaps."""
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


TARGETS = ("box", "box_overlap", "mask")


def score_map_targets(
    instances: List[Instances], num_classes: int, height: int, width: int, stride: int, target: str
):
    """
    Per-class target maps on the stride-``stride`` grid of the padded batch.

    ``target`` says which cells an object covers: "box", the release's rule (see
    ``_box_cells_release``); "box_overlap", every cell its box overlaps (small boxes are not lost);
    "mask", every cell its instance mask touches (objects without masks fall back to "box").

    Returns:
        targets: B x K x height x width, 1 where a ground-truth object of class k covers the cell;
        covered: B x 1 x height x width, cells covered by any object (the only cells the loss counts).
    """
    targets, covered = [], []
    for inst in instances:
        if target == "mask" and inst.has("gt_masks") and len(inst) > 0:
            cells = _mask_cells(inst.gt_masks, inst.image_size, height, width, stride)
        elif target == "box_overlap":
            cells = _box_cells_overlap(inst.gt_boxes.tensor, height, width, stride)
        else:
            cells = _box_cells_release(inst.gt_boxes.tensor, height, width, stride)
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

    @configurable
    def __init__(self, *, weight: float, stride: int, target: str):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"MODEL.DENSECLIP.SCORE_MAP_LOSS.TARGET must be one of {TARGETS}, got {target!r}")
        self.weight = weight
        self.stride = stride
        self.target = target

    @classmethod
    def from_config(cls, cfg):
        loss = cfg.MODEL.DENSECLIP.SCORE_MAP_LOSS
        return {"weight": loss.WEIGHT, "stride": loss.STRIDE, "target": loss.TARGET}

    def forward(self, score_map: torch.Tensor, instances: List[Instances], image_size: Tuple[int, int]):
        """
        Args:
            score_map: B x K x h x w logits (stride 32 of the padded batch).
            instances: per image, gt_boxes and gt_classes (and gt_masks for target "mask"), in the
                coordinates of the padded batch.
            image_size: (H, W) of the padded batch.
        Returns:
            scalar loss, already multiplied by the loss weight.
        """
        height, width = -(-image_size[0] // self.stride), -(-image_size[1] // self.stride)
        logits = F.interpolate(score_map.float(), size=(height, width), mode="bilinear", align_corners=False)
        targets, covered = score_map_targets(
            instances, score_map.shape[1], height, width, self.stride, self.target
        )
        losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * covered
        # Average over the entries of the whole distributed batch: DDP then averages gradients
        # across processes, so N processes x 1 image equals 1 process x N images.
        count = covered.sum().float() * score_map.shape[1]
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(count)
            count = count / comm.get_world_size()
        return self.weight * losses.sum() / count.clamp(min=1.0)
