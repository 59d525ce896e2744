"""What DenseCLIP adds to a Detectron2 detector: class-count checks and the auxiliary score-map loss."""
from contextlib import contextmanager
from typing import Dict, Iterator

import torch

from detectron2.config import configurable

from ..score_map import SCORE_MAP_KEY
from ..score_map_loss import ScoreMapLoss

__all__ = ["DenseCLIPDetectorMixin", "capture_score_map"]


@contextmanager
def capture_score_map(backbone: torch.nn.Module) -> Iterator[Dict[str, torch.Tensor]]:
    """
    Within the block, record what the backbone's forward computes: ``score_map`` (B x K x H/32 x W/32,
    absent for backbones without score maps) and ``image_size`` (the padded batch's H, W). The
    detector's own forward runs unchanged.
    """
    captured: Dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        captured["image_size"] = tuple(args[0].shape[-2:])
        if SCORE_MAP_KEY in output:
            captured["score_map"] = output[SCORE_MAP_KEY]

    handle = backbone.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


class DenseCLIPDetectorMixin:
    """
    Mixed in before a Detectron2 meta-architecture whose backbone is a language-guided CLIP-FPN.
    Adds ``loss_score_map`` in training; inference is the detector's own.
    """

    @configurable
    def __init__(self, *, score_map_loss: ScoreMapLoss, **kwargs):
        super().__init__(**kwargs)
        self.score_map_loss = score_map_loss
        class_names = getattr(self.backbone, "class_names", None)
        if class_names is None:
            raise ValueError(
                f"{type(self).__name__} needs a language-guided CLIP-FPN backbone: set "
                f"MODEL.DENSECLIP.ENABLED True with MODEL.BACKBONE.NAME build_clip_fpn_backbone or "
                f"build_retinanet_clip_fpn_backbone. (The CLIP baseline uses the stock RetinaNet or "
                f"GeneralizedRCNN meta-architecture.)"
            )
        if len(class_names) != self.num_classes:
            raise ValueError(
                f"The text prompts have {len(class_names)} classes ({', '.join(class_names[:5])}"
                f"{', ...' if len(class_names) > 5 else ''}) but the detector head has {self.num_classes} "
                f"(MODEL.RETINANET.NUM_CLASSES / MODEL.ROI_HEADS.NUM_CLASSES). Set the head's class count "
                f"to the dataset's, or fix MODEL.DENSECLIP.CLASS_NAMES."
            )

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["score_map_loss"] = ScoreMapLoss.from_config(cfg)
        return ret

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)
        with capture_score_map(self.backbone) as captured:
            losses = super().forward(batched_inputs)
        instances = [x["instances"].to(self.device) for x in batched_inputs]
        losses["loss_score_map"] = self.score_map_loss(
            captured["score_map"], instances, captured["image_size"]
        )
        return losses
