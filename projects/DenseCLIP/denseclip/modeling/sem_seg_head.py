"""Semantic FPN head with the release's options, and the cross-entropy rule its label-map losses share."""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead

from .backbone.clip_resnet import norm_for_device

__all__ = ["LOSS_NORMALIZATIONS", "SemanticFPNHead", "label_map_cross_entropy"]

#: MODEL.SEM_SEG_HEAD.LOSS_NORMALIZATION: the mean over "valid" (not ignored) pixels, Detectron2's rule;
#: or over "all" pixels of the label map, ignored ones counting 0, MMSegmentation 0.19's (the release).
LOSS_NORMALIZATIONS = ("valid", "all")


def label_map_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_value: int, normalization: str
) -> torch.Tensor:
    """
    Args:
        logits: B x K x H x W, at the label map's size.
        targets: B x H x W class indices, ``ignore_value`` where unlabelled.
        normalization: one of :data:`LOSS_NORMALIZATIONS`.
    Returns:
        the mean cross-entropy (a scalar).
    """
    if normalization == "valid":
        return F.cross_entropy(logits, targets, ignore_index=ignore_value)
    if normalization == "all":
        return F.cross_entropy(logits, targets, ignore_index=ignore_value, reduction="sum") / targets.numel()
    raise ValueError(f"MODEL.SEM_SEG_HEAD.LOSS_NORMALIZATION must be one of {LOSS_NORMALIZATIONS}, got {normalization!r}")


@SEM_SEG_HEADS_REGISTRY.register()
class SemanticFPNHead(SemSegFPNHead):
    """
    Detectron2's SemSegFPNHead (per level max(1, log2(stride / 4)) blocks of 3x3 conv + norm + ReLU,
    each followed by x2 bilinear upsampling above stride 4; the levels summed; a 1x1 classifier),
    with what the release's head (MMSegmentation's FPNHead) adds: each level resized to the stride-4
    size before the sum (inputs of any size), Dropout2d before the classifier
    (MODEL.SEM_SEG_HEAD.DROPOUT), logits resized bilinearly to the label map for the loss, and the
    loss averaged over all pixels or valid ones (MODEL.SEM_SEG_HEAD.LOSS_NORMALIZATION). "SyncBN" runs
    as Detectron2's NaiveSyncBatchNorm on CPU.

    Outputs (as SemSegFPNHead): in training ``(None, {"loss_sem_seg": loss})``; in inference
    ``(B x K x H x W logits at the padded input's size, {})``.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, dropout: float, loss_normalization: str, **kwargs):
        super().__init__(input_shape, **kwargs)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.DROPOUT must be in [0, 1), got {dropout}")
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.LOSS_NORMALIZATION must be one of {LOSS_NORMALIZATIONS}, got {loss_normalization!r}"
            )
        self.dropout = nn.Dropout2d(dropout)
        self.loss_normalization = loss_normalization
        # The release's classifier keeps PyTorch's default init (its training script never calls the head's
        # init_weights). Detectron2's MSRA fill instead gives a few-class classifier large initial logits
        # (loss about 7 for 6 classes), whose gradients slow AdamW's first thousand steps.
        self.predictor.reset_parameters()

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        missing = [name for name in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES if name not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES names {missing}, which the backbone does not output "
                f"({', '.join(input_shape)})"
            )
        ret["norm"] = norm_for_device(ret["norm"], cfg.MODEL.DEVICE)
        ret["dropout"] = cfg.MODEL.SEM_SEG_HEAD.DROPOUT
        ret["loss_normalization"] = cfg.MODEL.SEM_SEG_HEAD.LOSS_NORMALIZATION
        return ret

    @property
    def num_classes(self) -> int:
        return self.predictor.out_channels

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """B x K x h x w logits at the first level's size (stride 4); each coarser level's output is
        resized to it bilinearly, as MMSegmentation's FPNHead does (a no-op where the sizes halve exactly)."""
        x = self.scale_heads[0](features[self.in_features[0]])
        for name, head in zip(self.in_features[1:], self.scale_heads[1:]):
            y = head(features[name])
            # A traced graph must keep the resize for the sizes it will see, not the sample's.
            if torch.jit.is_tracing() or y.shape[-2:] != x.shape[-2:]:
                y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + y
        return self.predictor(self.dropout(x))

    def losses(self, predictions: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        predictions = F.interpolate(predictions.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
        loss = label_map_cross_entropy(predictions, targets, self.ignore_value, self.loss_normalization)
        return {"loss_sem_seg": loss * self.loss_weight}
