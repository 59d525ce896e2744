"""
Semantic segmentation on Detectron2's SemanticSegmentor: the release's inference and loss rule for any
backbone, and DenseCLIP's language-guided segmentor.

Interface:
- MODEL.META_ARCHITECTURE "SlidingWindowSemanticSegmentor" (the CLIP baselines) or
  "DenseCLIPSemanticSegmentor" (a LanguageGuidedBackbone: build_semantic_clip_fpn_backbone,
  build_semantic_clip_vit_fpn_backbone, build_semantic_attention_pool_fpn_backbone), with
  MODEL.SEM_SEG_HEAD.NAME "SemanticFPNHead" (or any Detectron2 sem-seg head).
- Training input: Detectron2's dicts with "image" (3 x H x W) and "sem_seg" (H x W int64 label map,
  MODEL.SEM_SEG_HEAD.IGNORE_VALUE where unlabelled). Losses: "loss_sem_seg", and for DenseCLIP
  "loss_score_map" (ScoreMapLoss with its "label_map" rule: cross-entropy of the score map cosine / tau
  resized bilinearly to the label map, x MODEL.DENSECLIP.SCORE_MAP_LOSS.WEIGHT), both averaged by
  MODEL.SEM_SEG_HEAD.LOSS_NORMALIZATION.
- Inference output per image: {"sem_seg": K x H x W logits on the original image ("height", "width")},
  plus "score_maps" (K x H x W score-map logits there) for DenseCLIP when asked (an input's
  "vocabulary", or MODEL.DENSECLIP.RETURN_SCORE_MAPS: see DenseCLIPModel). TEST.SEM_SEG.MODE "whole"
  runs the image at once, "slide" runs TEST.SEM_SEG.CROP_SIZE windows every TEST.SEM_SEG.STRIDE pixels
  and averages their logits.
  Each image (or window) is run on its own at its own size, as the release runs it: not padded to the
  backbone's size divisibility, so the FPN and head resize between levels (SizeMatchingFPN,
  SemanticFPNHead). Training batches are padded, as in Detectron2.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ..postprocessing import upsample_score_maps
from .denseclip import DenseCLIPModel

__all__ = ["DenseCLIPSemanticSegmentor", "SlidingWindowSemanticSegmentor", "sliding_windows"]

INFERENCE_MODES = ("whole", "slide")


def sliding_windows(
    height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]
) -> List[Tuple[int, int, int, int]]:
    """
    The release's (MMSegmentation 0.19) windows over an image: per axis max(ceil((size - crop) /
    stride), 0) + 1 starts at multiples of the stride, each window ``crop`` long, the last ones moved
    back to end at the border; a crop larger than the image is cut to the image.

    Returns:
        (y1, y2, x1, x2) per window, rows first.
    """
    def starts(size: int, crop: int, step: int) -> List[Tuple[int, int]]:
        count = max(-(-(size - crop) // step), 0) + 1
        spans = []
        for index in range(count):
            end = min(index * step + crop, size)
            spans.append((max(end - crop, 0), end))
        return spans

    return [(y1, y2, x1, x2) for y1, y2 in starts(height, crop_size[0], stride[0])
            for x1, x2 in starts(width, crop_size[1], stride[1])]


@META_ARCH_REGISTRY.register()
class SlidingWindowSemanticSegmentor(SemanticSegmentor):
    """
    Detectron2's SemanticSegmentor with the release's test: whole-image or sliding-window inference
    (TEST.SEM_SEG.*), one image at a time. Training is SemanticSegmentor's (the head's loss).
    """

    @configurable
    def __init__(self, *, test_mode: str, crop_size: Tuple[int, int], stride: Tuple[int, int], **kwargs):
        super().__init__(**kwargs)
        if test_mode not in INFERENCE_MODES:
            raise ValueError(f"TEST.SEM_SEG.MODE must be one of {INFERENCE_MODES}, got {test_mode!r}")
        if len(crop_size) != 2 or len(stride) != 2 or min(*crop_size, *stride) <= 0:
            raise ValueError(
                f"TEST.SEM_SEG.CROP_SIZE and STRIDE need two positive sizes (h, w), got {crop_size} and {stride}"
            )
        if stride[0] > crop_size[0] or stride[1] > crop_size[1]:
            raise ValueError(f"TEST.SEM_SEG.STRIDE {stride} must not exceed CROP_SIZE {crop_size} (pixels would be skipped)")
        self.test_mode = test_mode
        self.crop_size = tuple(crop_size)
        self.stride = tuple(stride)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["test_mode"] = cfg.TEST.SEM_SEG.MODE
        ret["crop_size"] = tuple(cfg.TEST.SEM_SEG.CROP_SIZE)
        ret["stride"] = tuple(cfg.TEST.SEM_SEG.STRIDE)
        return ret

    def forward(self, batched_inputs: List[dict]):
        if not self.training:
            return [self.inference_one(inputs) for inputs in batched_inputs]
        if "sem_seg" not in batched_inputs[0]:
            raise ValueError(
                "Training a semantic segmentor needs a 'sem_seg' label map in each input; use a dataset "
                "with sem_seg_file_name (e.g. ade20k_sem_seg_train) and a mapper that loads it"
            )
        images = ImageList.from_tensors(
            [self._normalize(x["image"]) for x in batched_inputs],
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )
        targets = ImageList.from_tensors(
            [x["sem_seg"].to(self.device) for x in batched_inputs],
            self.backbone.size_divisibility,
            self.sem_seg_head.ignore_value,
            self.backbone.padding_constraints,
        ).tensor
        return self.training_losses(images, targets)

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        return (image.to(self.device) - self.pixel_mean) / self.pixel_std

    def training_losses(self, images: ImageList, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Losses of a batch: images B x 3 x H x W (padded), targets B x H x W."""
        _, losses = self.sem_seg_head(self.backbone(images.tensor), targets)
        return losses

    def head_logits(self, features: Dict[str, torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """The head's B x K x h x w logits at its output stride (its ``layers``, as in Detectron2's
        sem-seg heads) resized bilinearly to ``size`` (H, W), as the release resizes its decode head's."""
        logits = self.sem_seg_head.layers(features)
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def predict(self, images: ImageList, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        """Eval-mode outputs of a batch (``batched_inputs``: its input dicts), each B x K x H x W at the
        input's size: {"sem_seg": logits}."""
        features = self.backbone(images.tensor)
        return {"sem_seg": self.head_logits(features, images.tensor.shape[-2:])}

    def predict_window(self, image: torch.Tensor, inputs: dict) -> Dict[str, torch.Tensor]:
        """:meth:`predict` on one normalised 3 x h x w image (or window of it; ``inputs`` is the image's
        input dict), run at its own size as the release runs it (not padded to the size divisibility: the
        FPN and head resize between levels): {name: K x h x w}."""
        images = ImageList(image[None], [tuple(image.shape[-2:])])
        return {name: out[0] for name, out in self.predict(images, [inputs]).items()}

    def segment(self, image: torch.Tensor, inputs: dict) -> Dict[str, torch.Tensor]:
        """Whole-image or sliding-window outputs of one normalised 3 x H x W image: {name: K x H x W}."""
        if self.test_mode == "whole":
            return self.predict_window(image, inputs)
        height, width = image.shape[-2:]
        sums: Dict[str, torch.Tensor] = {}
        count = image.new_zeros(height, width)
        for y1, y2, x1, x2 in sliding_windows(height, width, self.crop_size, self.stride):
            for name, out in self.predict_window(image[:, y1:y2, x1:x2], inputs).items():
                if name not in sums:
                    sums[name] = out.new_zeros(out.shape[0], height, width)
                sums[name][:, y1:y2, x1:x2] += out
            count[y1:y2, x1:x2] += 1
        return {name: total / count for name, total in sums.items()}

    def inference_one(self, inputs: dict) -> Dict[str, torch.Tensor]:
        """Outputs for one input dict, resized to its "height" x "width" (the original image)."""
        image = self._normalize(inputs["image"])
        size = tuple(image.shape[-2:])
        height, width = inputs.get("height", size[0]), inputs.get("width", size[1])
        return {name: sem_seg_postprocess(out, size, height, width) for name, out in self.segment(image, inputs).items()}


@META_ARCH_REGISTRY.register()
class DenseCLIPSemanticSegmentor(DenseCLIPModel, SlidingWindowSemanticSegmentor):
    """
    DenseCLIP for semantic segmentation: a LanguageGuidedBackbone (score map concatenated to one
    bottom-up feature before the FPN), a semantic FPN head, and the auxiliary loss on the score map
    against the label map. See the module docstring for inputs, losses and outputs.
    """

    def training_losses(self, images: ImageList, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        guided = self.extract_features(images)
        _, losses = self.sem_seg_head(guided.features, targets)
        losses["loss_score_map"] = self.score_map_loss(guided.score_map, targets)
        return losses

    def predict(self, images: ImageList, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        guided = self.extract_features(images)
        size = images.tensor.shape[-2:]
        outputs = {"sem_seg": self.head_logits(guided.features, size)}
        score_maps = self.requested_score_maps(batched_inputs, guided)
        if all(score_map is not None for score_map in score_maps):
            outputs["score_maps"] = upsample_score_maps(torch.stack(score_maps), size)
        return outputs
