"""DenseCLIP's auxiliary loss: the pixel-text score map against class maps drawn from the ground truth."""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.structures import BitMasks, Instances, PolygonMasks
from detectron2.utils import comm

from .sem_seg_head import LOSS_NORMALIZATIONS, label_map_cross_entropy
from .task import Task

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


#: MODEL.DENSECLIP.SCORE_MAP_LOSS.TARGET of detectors (instances) and of semantic segmentors (label maps).
INSTANCE_TARGETS = ("box", "box_overlap", "mask")
LABEL_MAP_TARGETS = ("label_map",)


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
    The auxiliary loss of all three tasks, by its ``target`` rule:

    - detectors ("box", "box_overlap", "mask": :func:`score_map_targets`): binary cross-entropy between
      sigmoid(score map upsampled to stride ``stride``) and the class maps of the ground truth, counted
      over all K channels of the cells some object covers, averaged over those (cell, class) entries of
      the whole (distributed) batch. No objects anywhere gives 0.
    - semantic segmentors ("label_map"): cross-entropy of the score map resized bilinearly to the label
      map, ``ignore_value`` pixels left out, averaged by ``normalization`` (:func:`label_map_cross_entropy`).

    The result is multiplied by ``weight``.
    """

    @configurable
    def __init__(
        self, *, weight: float, target: str, stride: int = 4, ignore_value: int = 255, normalization: str = "valid"
    ):
        super().__init__()
        if target not in INSTANCE_TARGETS + LABEL_MAP_TARGETS:
            raise ValueError(
                f"MODEL.DENSECLIP.SCORE_MAP_LOSS.TARGET must be one of {INSTANCE_TARGETS + LABEL_MAP_TARGETS} "
                f"(or empty for the task's own), got {target!r}"
            )
        if normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.LOSS_NORMALIZATION must be one of {LOSS_NORMALIZATIONS}, got {normalization!r}"
            )
        self.weight = weight
        self.target = target
        self.stride = stride
        self.ignore_value = ignore_value
        self.normalization = normalization

    @classmethod
    def from_config(cls, cfg, task: Task):
        """The loss of ``task``'s meta-architecture: its own target rule unless the config names one it takes."""
        loss = cfg.MODEL.DENSECLIP.SCORE_MAP_LOSS
        allowed = LABEL_MAP_TARGETS if task.semantic_segmentation else INSTANCE_TARGETS
        target = loss.TARGET or allowed[0]
        if target not in allowed:
            raise ValueError(
                f"MODEL.DENSECLIP.SCORE_MAP_LOSS.TARGET {target!r} does not fit MODEL.META_ARCHITECTURE "
                f"{cfg.MODEL.META_ARCHITECTURE} ({task.name.replace('_', ' ')}): use one of {allowed}, or leave it empty"
            )
        return {
            "weight": loss.WEIGHT,
            "target": target,
            "stride": loss.STRIDE,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "normalization": cfg.MODEL.SEM_SEG_HEAD.LOSS_NORMALIZATION,
        }

    def forward(
        self,
        score_map: torch.Tensor,
        targets: Union[List[Instances], torch.Tensor],
        image_size: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """
        Args:
            score_map: B x K x h x w logits (cosine / tau) of the padded batch.
            targets: per image, Instances with gt_boxes and gt_classes (and gt_masks for "mask") in the
                coordinates of the padded batch; or, for "label_map", the B x H x W label maps.
            image_size: (H, W) of the padded batch (instance targets).
        Returns:
            the scalar loss, already multiplied by the weight.
        """
        if self.target in LABEL_MAP_TARGETS:
            logits = F.interpolate(score_map.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
            return self.weight * label_map_cross_entropy(logits, targets, self.ignore_value, self.normalization)
        return self._instance_loss(score_map, targets, image_size)

    def _instance_loss(self, score_map: torch.Tensor, instances: List[Instances], image_size: Tuple[int, int]):
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
