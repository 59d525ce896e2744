"""Outputs on the original image (detections, score maps), in a form that also traces into TorchScript and
ONNX."""
from typing import Sequence

import torch
import torch.nn.functional as F

from detectron2.layers.mask_ops import _do_paste_mask
from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
from detectron2.structures import Instances

__all__ = ["paste_masks", "postprocess_instances", "score_maps_on_image", "upsample_score_maps"]


def upsample_score_maps(score_maps: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
    """B x K x h x w score maps (at the stride of the feature they join) resized bilinearly to the
    network input's (padded) H x W, as the release upsamples them: B x K x H x W."""
    return F.interpolate(score_maps, size=tuple(input_size), mode="bilinear", align_corners=False)


def score_maps_on_image(
    score_map: torch.Tensor, input_size: Sequence[int], image_size: Sequence[int], height, width
) -> torch.Tensor:
    """One image's K x h x w score map on its original image: upsampled to the network input
    (:func:`upsample_score_maps`), cropped to the image's part of it (``image_size``, without padding)
    and resized to ``height`` x ``width`` as Detectron2 resizes semantic outputs: K x height x width."""
    return sem_seg_postprocess(upsample_score_maps(score_map[None], input_size)[0], image_size, height, width)


@torch.jit.script_if_tracing
def paste_masks(
    masks: torch.Tensor, boxes: torch.Tensor, height: torch.Tensor, width: torch.Tensor, threshold: float
) -> torch.Tensor:
    """
    Paste N x M x M mask probabilities into N x height x width boolean masks, one mask at a time,
    as Detectron2's paste_masks_in_image does on the CPU (the same bilinear sampling and threshold).

    Unlike Detectron2's, it returns a boolean tensor also for N = 0: Detectron2's gives uint8 there,
    which an ONNX graph cannot type (both branches of its If node must agree).
    """
    height_, width_ = int(height), int(width)
    pasted = torch.zeros((0, height_, width_), dtype=torch.bool, device=masks.device)
    for index in range(masks.shape[0]):
        mask, _ = _do_paste_mask(masks[index : index + 1, None], boxes[index : index + 1], height_, width_, False)
        pasted = torch.cat([pasted, mask >= threshold], dim=0)
    return pasted


def postprocess_instances(instances: Instances, height, width, mask_threshold: float = 0.5) -> Instances:
    """
    Detectron2's detector_postprocess (boxes rescaled to ``height`` x ``width`` and clipped, empty
    boxes dropped, masks pasted). While tracing, the masks are pasted by :func:`paste_masks`, so the
    exported graph has the same outputs for any number of detections.
    """
    if not (torch.jit.is_tracing() and instances.has("pred_masks")):
        return detector_postprocess(instances, height, width, mask_threshold)
    fields = instances.get_fields()
    fields["roi_masks"] = fields.pop("pred_masks")[:, 0]  # filtered with the boxes, not pasted
    results = detector_postprocess(Instances(instances.image_size, **fields), height, width)
    roi_masks = results.get("roi_masks")
    results.remove("roi_masks")
    height, width = torch.as_tensor(height), torch.as_tensor(width)
    results.pred_masks = paste_masks(roi_masks, results.pred_boxes.tensor, height, width, mask_threshold)
    return results
